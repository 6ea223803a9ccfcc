"""Greedy decoding speed: kard_jax (jitted, KV cache, lax.while_loop) vs transformers' PyTorch
`generate(do_sample=False)` on the same config and weights.

Both sides get random t5x-style weights (our `T5.init`: lm_head std d_model**-0.5, untied for
the v1.1 shape) moved to transformers through `hf_io.export_hf`. EOS is suppressed on both sides
(ours: an eos id that is never produced; transformers: `min_new_tokens`) so both generate exactly
`--new_tokens` tokens per sequence. Compilation (ours) and one warm-up run (both) are excluded
from the timed runs; compile time is reported separately. Times are best-of-`--repeats` (the
least disturbed run on a shared machine) with the median alongside; tok/s = generated tokens
(batch * new_tokens) / end-to-end generate time (encoder included).

    python benchmarks/decode.py --shape small --batch 8 --input_len 512 --new_tokens 64
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

from kard_jax import hf_io
from kard_jax.models import decoding, t5


def _time(fn, repeats: int) -> tuple[float, float]:
    """(best, median) wall-clock seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=sorted(t5.PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (best and median reported)")
    parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args()

    cfg = t5.T5Config.from_preset(args.shape)
    model = t5.T5(cfg)
    rng = np.random.RandomState(0)
    enc = jnp.asarray(rng.randint(2, cfg.vocab_size, (args.batch, args.input_len)), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), enc[:, :8], enc[:, :8])["params"]
    params = meta.unbox(params)
    print(f"shape={args.shape} params={t5.param_count(params) / 1e6:.1f}M batch={args.batch} "
          f"input_len={args.input_len} new_tokens={args.new_tokens} backend={jax.default_backend()} "
          f"devices={len(jax.devices())} cpus={os.cpu_count()}")

    never_eos = -1  # a token id greedy decoding can never produce: every sequence runs to the end
    start = time.perf_counter()
    compiled = decoding.greedy_decode.lower(
        model, params, enc, max_decode_len=args.new_tokens, eos_id=never_eos
    ).compile()
    compile_s = time.perf_counter() - start
    run_ours = lambda: compiled(params, enc).block_until_ready()  # noqa: E731
    ours_tokens = np.asarray(run_ours())  # warm-up
    assert ours_tokens.shape == (args.batch, args.new_tokens)
    ours, ours_median = _time(run_ours, args.repeats)
    encode = jax.jit(lambda p, e: model.apply({"params": p}, e, method=t5.T5.encode))
    encode(params, enc).block_until_ready()
    encode_s, _ = _time(lambda: encode(params, enc).block_until_ready(), args.repeats)
    n_tokens = args.batch * args.new_tokens
    print(f"kard_jax  greedy_decode: compile {compile_s:.2f} s, run {ours:.3f} s (median {ours_median:.3f}, "
          f"encoder alone {encode_s:.3f}), {n_tokens / ours:.0f} tok/s")
    if args.skip_torch:
        return

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = hf_io.export_hf(params, cfg, os.path.join(tmp, "hf"))
        hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(np.asarray(enc, np.int64))
    mask = torch.ones_like(ids)

    def run_torch():
        with torch.inference_mode():
            return hf.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                decoder_start_token_id=cfg.decoder_start_token_id,
            )

    torch_tokens = run_torch().numpy()[:, 1:]  # warm-up; drop the decoder start token
    assert torch_tokens.shape == (args.batch, args.new_tokens)
    theirs, theirs_median = _time(run_torch, args.repeats)
    print(f"torch     generate:      run {theirs:.3f} s (median {theirs_median:.3f}), {n_tokens / theirs:.0f} tok/s "
          f"(torch threads {torch.get_num_threads()})")
    agree = float(np.mean(ours_tokens == torch_tokens))
    print(f"speed-up (torch time / ours): {theirs / ours:.2f}x best, {theirs_median / ours_median:.2f}x median; "
          f"token agreement {agree:.3f} "
          "(EOS is suppressed only on the torch side, so a sequence may differ after an EOS)")


if __name__ == "__main__":
    main()
