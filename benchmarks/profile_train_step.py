r"""Where the time of kard_jax's jitted T5 train step goes (CPU or accelerator).

Builds exactly the model / optimizer / batch that `t5_train_step.py --side jax` times
(`t5_train_step.build_jax`), compiles the step, then

1. writes the optimized HLO (`compiled.as_text()`) to `--out_dir/train_step.hlo.txt`;
2. times `--steps` steps after `--warmup` warm-up steps (wall clock);
3. traces `--trace_steps` more steps with `jax.profiler.trace(create_perfetto_trace=True)` and
   reads the per-op events of the trace: on CPU every executed HLO instruction (fusion,
   custom call, copy, ...) of the entry computation is one event named after it;
4. puts each instruction in a category from the optimized HLO itself: anything whose fused
   computation holds a `dot`/`convolution` is a matmul; a `copy`/`transpose` is a copy; the rest
   by the Python source line the instruction came from (HLO stack frames): `losses.py` = cross-
   entropy, optax / train_state = optimizer update, `RMSNorm` = layernorm, `MultiHeadAttention`
   = attention softmax/mask, relative-position buckets/padding/causal masks = position bias, ...
5. prints category, summed op time per step, share of the summed op time, and that share of
   the measured wall-clock step (ops may run concurrently on several threads, so the summed op
   time can exceed the wall time); then the FLOP count (`compiled.cost_analysis()`) and the
   achieved GFLOP/s; and the 12 most expensive instructions.

    python benchmarks/profile_train_step.py                        # small shape, batch 8, 512 / 128
    python benchmarks/profile_train_step.py --batch 2 --steps 1    # quicker while iterating
    python benchmarks/profile_train_step.py --xla_flags="--xla_cpu_use_xnnpack=false"  # try a flag

`--xla_flags` is appended to XLA_FLAGS before jax is imported.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Categories, in print order.
MATMUL, COPY, CE, OPT, NORM, ATTN, POSBIAS, MLP, RESID, EMBED, OTHER = (
    "matmul (dot/conv)", "copy/transpose", "cross-entropy (vocab)", "optimizer update + norms",
    "layernorm (RMSNorm)", "attention softmax/mask", "position bias/masks", "gelu/mlp elementwise",
    "residual adds", "embedding gather/scatter", "other",
)
CATEGORIES = (MATMUL, CE, OPT, NORM, ATTN, POSBIAS, MLP, RESID, EMBED, COPY, OTHER)

# (file suffix, function-name regex or None, category): the first rule matching the innermost
# frame wins, walking outwards.
SOURCE_RULES = (
    ("kard_jax/models/losses.py", None, CE),
    ("kard_jax/models/base.py", r"loss_fn|score_batch", CE),
    ("kard_jax/training/train_state.py", None, OPT),
    ("kard_jax/training/optimizers.py", None, OPT),
    ("kard_jax/training/trainer.py", r"_train_step|_grads|_divide|_weighted_aux", OPT),
    ("kard_jax/models/t5.py", r"RMSNorm", NORM),
    ("kard_jax/models/t5.py", r"relative_position_bucket|RelativePositionBiases|_padding_bias|^Encoder\.|^Decoder\.", POSBIAS),
    ("kard_jax/models/t5.py", r"MultiHeadAttention", ATTN),
    ("kard_jax/models/t5.py", r"MlpBlock", MLP),
    ("kard_jax/models/t5.py", r"Embed", EMBED),
    ("kard_jax/models/t5.py", r"EncoderLayer|DecoderLayer|_dropout", RESID),
    ("optax/", None, OPT),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", help="a t5_train_step.SHAPES key")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input_len", type=int, default=512)
    p.add_argument("--target_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--trace_steps", type=int, default=1, help="steps run under the profiler (0: no trace)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", choices=["none", "full"], default="none")
    p.add_argument("--model_parallel", type=int, default=1)
    p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before jax is imported")
    p.add_argument("--malloc", choices=["retain", "default"], default="retain",
                   help="kard_jax.cpu_runtime's glibc settings on CPU (what kard_jax.main applies), or none")
    p.add_argument("--out_dir", default="", help="where the HLO and trace go (default: a new temp dir)")
    p.add_argument("--top", type=int, default=12, help="how many of the most expensive instructions to list")
    return p.parse_args(argv)


# ----- optimized HLO parsing -----
_COMP_RE = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")


class Instr:
    __slots__ = ("name", "shape", "opcode", "calls", "frame", "is_root")

    def __init__(self, name, shape, opcode, rest, is_root):
        self.name, self.shape, self.opcode, self.is_root = name, shape, opcode, is_root
        self.calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
        m = re.search(r"stack_frame_id=(\d+)", rest)
        self.frame = int(m.group(1)) if m else None


class Hlo:
    """The computations, instructions and stack-frame tables of an optimized HLO module's text."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instr]] = {}
        self.entry: str | None = None
        tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
        section, current = None, None
        for line in text.splitlines():
            if line in tables:
                section = line
                continue
            if section and line.strip() and re.match(r"^\d+ ", line):
                key, value = line.split(" ", 1)
                tables[section][int(key)] = value
                continue
            section = None
            line = re.sub(r"/\*.*?\*/", "", line)  # /*index=5*/ comments
            m = _COMP_RE.match(line)
            if m and "=" not in line.split("{")[0]:
                current = m.group(2)
                self.computations[current] = []
                if m.group(1):
                    self.entry = current
                continue
            m = _INSTR_RE.match(line)
            if m and current is not None:
                self.computations[current].append(Instr(m.group(2), m.group(3), m.group(4), m.group(5), bool(m.group(1))))
        self.files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
        self.functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
        self.locations = {}
        for k, v in tables["FileLocations"].items():
            f = re.search(r"file_name_id=(\d+)", v)
            fn = re.search(r"function_name_id=(\d+)", v)
            ln = re.search(r"line=(\d+)", v)
            self.locations[k] = (self.files.get(int(f.group(1)), "?") if f else "?",
                                 self.functions.get(int(fn.group(1)), "?") if fn else "?",
                                 int(ln.group(1)) if ln else 0)
        self.frames = {}
        for k, v in tables["StackFrames"].items():
            loc = re.search(r"file_location_id=(\d+)", v)
            parent = re.search(r"parent_frame_id=(\d+)", v)
            self.frames[k] = (int(loc.group(1)) if loc else None, int(parent.group(1)) if parent else None)
        self._contains_cache: dict[str, set[str]] = {}

    def stack(self, frame_id: int | None) -> list[tuple[str, str, int]]:
        """(file, function, line) from the innermost frame outwards."""
        out, seen = [], set()
        while frame_id and frame_id in self.frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = self.frames[frame_id]
            if loc in self.locations:
                out.append(self.locations[loc])
            frame_id = parent if parent != frame_id else None
        return out

    def opcodes_in(self, computation: str) -> set[str]:
        """Every opcode in a computation and the computations it calls."""
        if computation not in self._contains_cache:
            self._contains_cache[computation] = set()  # cycle guard
            ops = set()
            for ins in self.computations.get(computation, []):
                ops.add(ins.opcode)
                for c in ins.calls:
                    ops |= self.opcodes_in(c)
            self._contains_cache[computation] = ops
        return self._contains_cache[computation]

    def entry_instructions(self) -> dict[str, Instr]:
        return {i.name: i for i in self.computations.get(self.entry, [])}

    def all_instructions(self) -> dict[str, Instr]:
        return {i.name: i for comp in self.computations.values() for i in comp}


def source_category(stack: list[tuple[str, str, int]]) -> str | None:
    for file, function, _ in stack:
        for suffix, fn_re, category in SOURCE_RULES:
            if suffix in file and (fn_re is None or re.search(fn_re, function)):
                return category
    return None


def categorize(hlo: Hlo, ins: Instr) -> str:
    ops = {ins.opcode}
    for c in ins.calls:
        ops |= hlo.opcodes_in(c)
    if ops & {"dot", "convolution"}:
        return MATMUL
    if ins.opcode in ("copy", "transpose", "copy-start", "copy-done") or (
        ins.calls and ops - {"parameter", "bitcast"} <= {"copy", "transpose", "fusion"}
    ):
        return COPY
    if ins.opcode in ("gather", "scatter") or (ins.calls and ops & {"gather", "scatter"} and not ops & {"exp", "log"}):
        category = source_category(hlo.stack(ins.frame))
        return category if category in (EMBED, POSBIAS, CE) else EMBED
    category = source_category(hlo.stack(ins.frame))
    if category is None:  # the fusion's own metadata is missing: vote over its instructions
        votes = collections.Counter(
            source_category(hlo.stack(i.frame)) for c in ins.calls for i in hlo.computations.get(c, [])
        )
        votes.pop(None, None)
        category = votes.most_common(1)[0][0] if votes else None
    return category or OTHER


# ----- trace parsing -----
def op_times_from_trace(trace_dir: str, names: set[str]) -> tuple[dict[str, float], int]:
    """HLO instruction name -> summed duration (seconds) over the trace, and how many events."""
    path = None
    for root, _, files in os.walk(trace_dir):
        for f in files:
            if f.endswith("perfetto_trace.json.gz"):
                path = os.path.join(root, f)
    if path is None:
        raise RuntimeError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times: dict[str, float] = collections.defaultdict(float)
    n = 0
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            times[e["name"]] += e.get("dur", 0) / 1e6
            n += 1
    return times, n


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax

    sys.path.insert(0, HERE)
    from t5_train_step import build_jax

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="kard_profile_")
    os.makedirs(out_dir, exist_ok=True)

    trainer, cfg, devices, batch_np = build_jax(args)
    state = trainer.init_state({k: v.shape for k, v in batch_np.items()})
    batch = trainer.global_batch(batch_np)
    compiled = trainer.compile_train_step(state, batch)
    hlo_text = compiled.as_text()
    hlo_path = os.path.join(out_dir, "train_step.hlo.txt")
    with open(hlo_path, "w") as f:
        f.write(hlo_text)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))

    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    timed = times[args.warmup:] or times
    step_s = sum(timed) / len(timed)
    cpu_timed = cpu_times[args.warmup:] or cpu_times

    print(f"shape={args.shape} batch={args.batch} {args.input_len} in / {args.target_len} target, "
          f"backend={jax.default_backend()} devices={len(devices)} cpus={os.cpu_count()} "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"compile {trainer.compile_seconds:.1f}s; step {step_s:.3f}s "
          f"(timed {', '.join(f'{t:.2f}' for t in timed)}; warm-up {', '.join(f'{t:.2f}' for t in times[:args.warmup])}); "
          f"process CPU {sum(cpu_timed) / len(cpu_timed):.3f}s/step (less sensitive to other load)")
    if flops:
        print(f"FLOPs/step (cost_analysis) {flops / 1e9:.1f} GFLOP -> {flops / step_s / 1e9:.1f} GFLOP/s achieved; "
              f"6*params*tokens = {6 * cfg.num_params() * args.batch * (args.input_len + args.target_len) / 1e9:.1f} GFLOP")
    print(f"optimized HLO: {hlo_path}")
    if args.trace_steps <= 0:
        return

    hlo = Hlo(hlo_text)
    entry = hlo.entry_instructions()
    everything = hlo.all_instructions()  # ops inside while/call bodies (scan_layers) get events too
    trace_dir = os.path.join(out_dir, "trace")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.trace_steps):
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics["loss"])
    traced_s = (time.perf_counter() - start) / args.trace_steps
    op_times, n_events = op_times_from_trace(trace_dir, set(everything))
    per_step = {k: v / args.trace_steps for k, v in op_times.items()}
    busy = sum(per_step.values())
    by_cat: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    for name, t in per_step.items():
        ins = entry.get(name) or everything[name]
        c = categorize(hlo, ins)
        by_cat[c] += t
        count[c] += 1
    print(f"trace: {trace_dir} ({n_events} op events over {args.trace_steps} step(s); traced step {traced_s:.3f}s wall, "
          f"summed op time {busy:.3f}s/step = {busy / traced_s:.2f}x wall)")
    print(f"{'category':28s} {'op ms/step':>11s} {'share':>7s} {'of wall ms':>11s} {'#ops':>6s}")
    for c in CATEGORIES:
        if by_cat.get(c):
            share = by_cat[c] / busy
            print(f"{c:28s} {1e3 * by_cat[c]:11.1f} {100 * share:6.1f}% {1e3 * share * step_s:11.1f} {count[c]:6d}")
    print(f"{'total':28s} {1e3 * busy:11.1f} {100.0:6.1f}% {1e3 * step_s:11.1f} {sum(count.values()):6d}")
    print(f"top {args.top} instructions:")
    for name, t in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        ins = entry.get(name) or everything[name]
        where = next(((os.path.basename(f), fn, ln) for f, fn, ln in hlo.stack(ins.frame)
                      if "site-packages/jax/" not in f), ("?", "?", 0))
        print(f"  {1e3 * t:9.1f} ms {100 * t / busy:5.1f}%  {categorize(hlo, ins):26s} {name} {ins.shape[:60]} "
              f"<- {where[0]}:{where[2]} {where[1]}")


if __name__ == "__main__":
    main()
