"""Decoding speed: kard_jax (jitted, KV cache, lax.while_loop) vs transformers' PyTorch
`generate` on the same config and weights, greedy or self-consistency sampling.

  --mode greedy   ours `greedy_decode`  vs  `generate(do_sample=False)`
  --mode sample   ours `sample_decode(num_decodes=5, top_k=50, top_p=0.95)` (per-input keys, as
                  inference uses it)  vs  `generate(do_sample=True, top_k=50, top_p=0.95,
                  num_return_sequences=5)`: both encode each input once; ours also computes and
                  caches each input's encoder-decoder K/V once for its 5 samples.

Both sides get random t5x-style weights (our `T5.init`: lm_head std d_model**-0.5, untied for
the v1.1 shape) moved to transformers through `hf_io.export_hf`. EOS is suppressed on both sides
(ours: an eos id that is never produced; transformers: `min_new_tokens`) so both generate exactly
`--new_tokens` tokens per sequence. Compilation (ours, reported separately) and `--warmup` rounds
are excluded; then the two sides run INTERLEAVED in this one process (ours, theirs, ours,
theirs, ... `--repeats` rounds), so a shared machine's noise falls on both. Reported: best (the
least disturbed run) and median per side, the ratio (ours speed / theirs = their time / ours),
tok/s = generated tokens (batch * samples * new_tokens) / end-to-end time (encoder included), an
achieved GFLOP/s from a FLOP count of the useful work (below), and the CPU line
(`cpu_info.describe()`: model, AVX2 / AVX-512 / AMX, cores, threads) next to the ratio.

FLOP count (2 per multiply-add, the work needed once, the same for both sides): encoder layers
and attention over batch * input_len tokens; each input's encoder-decoder K/V projections once;
per generated token the decoder's self-attention and cross-attention projections, its attention
over the cache (mean length) and over the input, the MLP and the lm_head.

    python benchmarks/decode.py --shape small --batch 8 --input_len 512 --new_tokens 64 --mode greedy
    python benchmarks/decode.py --shape small --batch 8 --input_len 512 --new_tokens 64 --mode sample
"""
import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from kard_jax import cpu_runtime, hf_io
from kard_jax.models import decoding, t5

try:
    import cpu_info  # run as a script: benchmarks/ is on sys.path
except ImportError:  # python -m benchmarks.decode
    from benchmarks import cpu_info


def useful_flops(cfg: t5.T5Config, batch: int, input_len: int, rows: int, new_tokens: int) -> float:
    """FLOPs of one generate call (see the module docstring): `batch` inputs of `input_len`
    tokens, `rows` = batch * samples sequences of `new_tokens` tokens."""
    d, hkv, ff, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    mlp = (3 if cfg.is_gated else 2) * d * ff
    encoder = cfg.num_encoder_layers * (4 * d * hkv + mlp + 2 * input_len * hkv)  # per input token
    cross_kv = cfg.num_decoder_layers * 2 * d * hkv  # per input token, once per input
    mean_cache = (new_tokens + 1) / 2
    per_token = cfg.num_decoder_layers * (6 * d * hkv + mlp + 2 * mean_cache * hkv + 2 * input_len * hkv) + d * v
    return 2.0 * (batch * input_len * (encoder + cross_kv) + rows * new_tokens * per_token)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=sorted(t5.PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--mode", choices=["greedy", "sample"], default="greedy")
    parser.add_argument("--num_samples", type=int, default=5, help="--mode sample: sequences per input")
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--warmup", type=int, default=2, help="untimed interleaved rounds after compilation")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (best and median reported)")
    parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="kard_jax.cpu_runtime's glibc settings on CPU (what kard_jax.main applies; this one "
                             "process runs both sides, so they apply to both), or none")
    args = parser.parse_args()
    cpu_runtime.configure(retain_memory=args.malloc == "retain")  # before the first JAX computation
    sample = args.mode == "sample"
    samples = args.num_samples if sample else 1

    cfg = t5.T5Config.from_preset(args.shape)
    model = t5.T5(cfg)
    rng = np.random.RandomState(0)
    enc = jnp.asarray(rng.randint(2, cfg.vocab_size, (args.batch, args.input_len)), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), enc[:, :8], enc[:, :8])["params"]
    params = meta.unbox(params)
    rows = args.batch * samples
    n_tokens = rows * args.new_tokens
    flops = useful_flops(cfg, args.batch, args.input_len, rows, args.new_tokens)
    what = (f"sample x{samples} top_k={args.top_k} top_p={args.top_p}" if sample else "greedy")
    print(f"mode={args.mode} ({what}) malloc={args.malloc} shape={args.shape} params={t5.param_count(params) / 1e6:.1f}M "
          f"batch={args.batch} input_len={args.input_len} new_tokens={args.new_tokens} "
          f"backend={jax.default_backend()} devices={len(jax.devices())}; {flops / 1e9:.1f} GFLOP per call")

    never_eos = -1  # a token id decoding can never produce: every sequence runs to the end
    start = time.perf_counter()
    if sample:
        keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.batch))  # one key per input, as inference
        compiled = decoding.sample_decode.lower(
            model, params, enc, keys, max_decode_len=args.new_tokens, num_decodes=samples,
            temperature=1.0, top_k=args.top_k, top_p=args.top_p, eos_id=never_eos,
        ).compile()
        run_ours = lambda: compiled(params, enc, keys)[0].block_until_ready()  # noqa: E731
    else:
        compiled = decoding.greedy_decode.lower(
            model, params, enc, max_decode_len=args.new_tokens, eos_id=never_eos
        ).compile()
        run_ours = lambda: compiled(params, enc).block_until_ready()  # noqa: E731
    compile_s = time.perf_counter() - start
    ours_tokens = np.asarray(run_ours()).reshape(rows, args.new_tokens)
    encode = jax.jit(lambda p, e: model.apply({"params": p}, e, method=t5.T5.encode))
    encode(params, enc).block_until_ready()
    encode_s = min(_timed(lambda: encode(params, enc).block_until_ready()) for _ in range(2))

    run_torch = None
    if not args.skip_torch:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(args.torch_threads)
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = hf_io.export_hf(params, cfg, os.path.join(tmp, "hf"))
            hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
        ids = torch.from_numpy(np.asarray(enc, np.int64))
        mask = torch.ones_like(ids)
        sampling = (dict(do_sample=True, top_k=args.top_k, top_p=args.top_p, temperature=1.0,
                         num_return_sequences=samples) if sample else dict(do_sample=False))

        def run_torch():
            with torch.inference_mode():
                return hf.generate(
                    input_ids=ids, attention_mask=mask, num_beams=1, **sampling,
                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                    decoder_start_token_id=cfg.decoder_start_token_id,
                )

        torch_tokens = run_torch().numpy()[:, 1:]  # drop the decoder start token
        assert torch_tokens.shape == (rows, args.new_tokens), torch_tokens.shape

    for _ in range(args.warmup):
        run_ours()
        if run_torch:
            run_torch()
    ours_times, theirs_times = [], []
    for _ in range(args.repeats):  # interleaved: ours, theirs, ours, theirs, ...
        ours_times.append(_timed(run_ours))
        if run_torch:
            theirs_times.append(_timed(run_torch))

    def line(name, times, extra=""):
        best, median = min(times), statistics.median(times)
        return (f"{name} best {best:.3f} s, median {median:.3f} s ({', '.join(f'{t:.2f}' for t in times)}); "
                f"{n_tokens / best:.0f} tok/s, {flops / best / 1e9:.1f} GFLOP/s{extra}")

    print(line("kard_jax  " + ("sample_decode" if sample else "greedy_decode"), ours_times,
               f"; compile {compile_s:.2f} s, encoder alone {encode_s:.3f} s"))
    if not run_torch:
        print(cpu_info.describe())
        return
    print(line("torch     generate     ", theirs_times))
    best_ratio = min(theirs_times) / min(ours_times)
    median_ratio = statistics.median(theirs_times) / statistics.median(ours_times)
    print(f"ratio (ours speed / theirs) {args.mode}: {best_ratio:.2f}x best, {median_ratio:.2f}x median "
          f"[{cpu_info.describe()}]")
    if not sample:
        agree = float(np.mean(ours_tokens == torch_tokens))
        print(f"token agreement {agree:.3f} (EOS is suppressed only on the torch side, so a sequence may "
              "differ after an EOS)")


if __name__ == "__main__":
    main()
