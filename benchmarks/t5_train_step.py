r"""Side-by-side train-step speed: kard_jax's jitted T5 step vs transformers' PyTorch T5.

Each side runs in its own subprocess (so peak memory is measured separately), on the same
random batch and the same architecture (T5 v1.1 gated-gelu, untied lm_head), AdamW (lr 1e-4, global-norm
clipping 1.0), t5x-style init on both sides (untied lm_head std d_model**-0.5).

    python benchmarks/t5_train_step.py --shape small --steps 3 --warmup 2
    python benchmarks/t5_train_step.py --shape base --side jax --peak_tflops 197   # e.g. on a TPU v4 chip

Prints per side: compile / first-step time, mean step time, tokens/s (inputs + targets, padding
included), peak RSS; then the throughput ratio and, with --peak_tflops, the MFU estimate
6 * params * tokens_per_step / step_time / peak_flops.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8, vocab_size=32128),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12, vocab_size=32128),
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, vocab_size=512),
}


def make_batch(args, vocab_size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    enc = rng.integers(2, vocab_size, size=(args.batch, args.input_len)).astype(np.int32)
    tgt = rng.integers(2, vocab_size, size=(args.batch, args.target_len)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((args.batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
            "decoder_loss_weights": np.ones_like(tgt, dtype=np.float32)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_jax(args):
    """(trainer, config, devices, numpy batch): the model, optimizer and batch `run_jax` times
    (also what `profile_train_step.py` profiles). First, as `kard_jax.main` does, the CPU
    runtime settings (`cpu_runtime.configure`), unless `--malloc=default`."""
    from kard_jax import cpu_runtime

    cpu_runtime.configure(retain_memory=getattr(args, "malloc", "retain") == "retain")
    import jax

    from kard_jax.models import t5
    from kard_jax.models.base import EncoderDecoderModel
    from kard_jax.training import optimizers, partitioning
    from kard_jax.training.trainer import Trainer

    s = SHAPES[args.shape]
    cfg = t5.T5Config(vocab_size=s["vocab_size"], d_model=s["d_model"], d_kv=s["d_kv"], d_ff=s["d_ff"],
                      num_heads=s["num_heads"], num_encoder_layers=s["num_layers"], num_decoder_layers=s["num_layers"],
                      dtype=args.dtype, remat_policy=args.remat)
    mesh_config = partitioning.MeshConfig(data=-1, model=args.model_parallel)
    devices = jax.devices()
    if jax.default_backend() == "cpu":
        devices = devices[:1]
        mesh_config = partitioning.MeshConfig(data=1, model=1)
    trainer = Trainer(EncoderDecoderModel(t5.T5(cfg)), optimizers.adamw(1e-4),
                      mesh=mesh_config.make_mesh(devices), logical_axis_rules=partitioning.standard_logical_axis_rules())
    return trainer, cfg, devices, make_batch(args, cfg.vocab_size)


def run_jax(args) -> dict:
    import jax

    trainer, cfg, devices, batch_np = build_jax(args)
    state = trainer.init_state({k: v.shape for k, v in batch_np.items()})
    batch = trainer.global_batch(batch_np)
    compiled = trainer.compile_train_step(state, batch)
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    times, losses, usage = [], [], []
    for i in range(args.warmup + args.steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done
        times.append(time.perf_counter() - start)
        usage.append(_usage_since(before))
    mem = trainer.memory_analysis
    return {
        "side": "jax", "backend": jax.default_backend(), "devices": len(devices), "malloc": args.malloc,
        "usage": usage[args.warmup:],
        "compile_s": trainer.compile_seconds, "xla_flops": float(cost.get("flops", 0.0)), "step_times": times[args.warmup:], "warmup_times": times[:args.warmup],
        "losses": losses, "params": cfg.num_params(), "peak_rss_gb": peak_rss_gb(),
        "xla_temp_gb": getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else None,
    }


def _usage_since(before) -> dict:
    """User / system CPU seconds and minor page faults since `before` (a getrusage result)."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": now.ru_utime - before.ru_utime, "sys_s": now.ru_stime - before.ru_stime,
            "minflt": now.ru_minflt - before.ru_minflt}


def run_torch(args) -> dict:
    if args.torch_malloc == "retain":  # the same glibc settings as ours, for a like-for-like row
        from kard_jax import cpu_runtime

        cpu_runtime.retain_freed_memory()
    import torch
    import transformers

    s = SHAPES[args.shape]
    torch.manual_seed(0)
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    config = transformers.T5Config(
        vocab_size=s["vocab_size"], d_model=s["d_model"], d_kv=s["d_kv"], d_ff=s["d_ff"], num_heads=s["num_heads"],
        num_layers=s["num_layers"], num_decoder_layers=s["num_layers"], feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )
    # transformers' own T5 init is t5x's (query std (d_model*d_kv)**-0.5, key/value/wi d_model**-0.5,
    # out (heads*d_kv)**-0.5, wo d_ff**-0.5, embeddings 1.0) except lm_head (std 1.0, which starts
    # the loss near 83 and floods the backward pass with denormals). transformers 5 also ties
    # lm_head to the embeddings when built from a config: untie it, std d_model**-0.5.
    model = transformers.T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.empty(s["vocab_size"], s["d_model"]))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, s["d_model"] ** -0.5)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    b = make_batch(args, s["vocab_size"])
    enc = torch.from_numpy(b["encoder_input_tokens"]).long()
    labels = torch.from_numpy(b["decoder_target_tokens"]).long()
    times, losses, usage = [], [], []
    for i in range(args.warmup + args.steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = model(input_ids=enc, attention_mask=torch.ones_like(enc), labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        times.append(time.perf_counter() - start)
        usage.append(_usage_since(before))
    params = sum(p.numel() for p in model.parameters())
    return {"side": "torch", "threads": torch.get_num_threads(), "step_times": times[args.warmup:],
            "malloc": args.torch_malloc, "usage": usage[args.warmup:],
            "warmup_times": times[:args.warmup], "losses": losses, "params": params, "peak_rss_gb": peak_rss_gb()}


def summarize(r: dict, args) -> dict:
    step = statistics.mean(r["step_times"])
    tokens = args.batch * (args.input_len + args.target_len)
    r["step_s"] = step
    r["tokens_per_s"] = tokens / step
    if args.peak_tflops:
        r["mfu"] = 6 * r["params"] * tokens / step / (args.peak_tflops * 1e12)
    return r


def jax_backend_is_cpu(results: dict) -> bool:
    return results.get("jax", {}).get("backend", "cpu") == "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input_len", type=int, default=512)
    p.add_argument("--target_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--side", choices=["both", "jax", "torch"], default="both")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per side (each a fresh process)")
    p.add_argument("--dtype", default="float32", help="JAX activation dtype (bfloat16 on TPU)")
    p.add_argument("--remat", choices=["none", "full"], default="none")
    p.add_argument("--model_parallel", type=int, default=1, help="model axis size on accelerators")
    p.add_argument("--torch_threads", type=int, default=0, help="0 = all cores")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="per-chip peak (TPU v4: 275 bf16) for MFU")
    p.add_argument("--malloc", choices=["retain", "default"], default="retain",
                   help="our side: kard_jax.cpu_runtime's glibc settings on CPU (what kard_jax.main applies), or none")
    p.add_argument("--torch_malloc", choices=["default", "retain"], default="default",
                   help="PyTorch side: glibc defaults, or the same settings as ours (a like-for-like row)")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child-process mode
    args = p.parse_args()

    if args.json:
        result = run_jax(args) if args.side == "jax" else run_torch(args)
        print("RESULT " + json.dumps(result))
        return

    results, rounds = {}, {}
    sides = ["jax", "torch"] if args.side == "both" else [args.side]
    # Interleaved (jax, torch, jax, torch, ...): noise from a shared machine falls on both sides.
    # Each round is a fresh subprocess (peak memory per side); a side's figure is its best round's
    # mean step (the least disturbed), every round's mean is printed.
    for _ in range(args.rounds):
        for side in sides:
            options = {**vars(args), "side": side, "json": True}
            cmd = [sys.executable, os.path.abspath(__file__)] + [
                f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items() if v is not False
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                sys.exit(1)
            r = summarize(json.loads(line[len("RESULT "):]), args)
            rounds.setdefault(side, []).append(r["step_s"])
            if side not in results or r["step_s"] < results[side]["step_s"]:
                results[side] = r

    tokens = args.batch * (args.input_len + args.target_len)
    print(f"shape={args.shape} batch={args.batch} {args.input_len} in / {args.target_len} target "
          f"({tokens} tokens/step), {args.warmup} warm-up + {args.steps} timed steps, cpus={os.cpu_count()}")
    for side, r in results.items():
        extra = f" compile={r['compile_s']:.1f}s" if "compile_s" in r else f" threads={r.get('threads')}"
        mfu = f" MFU={100 * r['mfu']:.1f}%" if "mfu" in r else ""
        use = r["usage"]
        cpu = (f" cpu/step user {statistics.mean(u['user_s'] for u in use):.2f}s sys "
               f"{statistics.mean(u['sys_s'] for u in use):.2f}s, {statistics.mean(u['minflt'] for u in use):.0f} "
               f"page faults; malloc={r['malloc']}")
        print(f"  {side:5s}: step={r['step_s']:.3f}s best of rounds {', '.join(f'{t:.2f}' for t in rounds[side])} "
              f"(timed {', '.join(f'{t:.2f}' for t in r['step_times'])}){cpu} "
              f"tokens/s={r['tokens_per_s']:.0f} peak_rss={r['peak_rss_gb']:.2f}GB params={r['params'] / 1e6:.1f}M"
              f" loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}{extra}{mfu}")
    try:
        import cpu_info  # run as a script: benchmarks/ is on sys.path
    except ImportError:
        from benchmarks import cpu_info
    # The same computation on both sides: XLA's count of our step's FLOPs (matmuls, attention, loss,
    # optimizer; the input embedding is a gather) divides both step times.
    flops = next((r["xla_flops"] for r in results.values() if r.get("xla_flops")), 0.0)
    peak = cpu_info.fp32_peak_gflops()
    if flops and jax_backend_is_cpu(results):
        for side, r in results.items():
            share = f", {100 * flops / r['step_s'] / 1e9 / peak:.0f}% of the nominal fp32 peak {peak:.0f} GFLOP/s" if peak else ""
            print(f"  {side:5s}: {flops / 1e9:.0f} GFLOP/step -> {flops / r['step_s'] / 1e9:.1f} GFLOP/s{share}")
    if len(results) == 2:
        ratio = results["jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        print(f"  throughput ratio jax/torch = {ratio:.2f}x  [{cpu_info.describe()}]")
    else:
        print(f"  [{cpu_info.describe()}]")
    print("  MFU formula: 6 * params * tokens_per_step / step_time / (peak_tflops * 1e12)"
          + ("" if args.peak_tflops else "  (pass --peak_tflops to compute)"))


if __name__ == "__main__":
    main()
