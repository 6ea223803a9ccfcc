"""Self-consistency decoding shares each input's encoder-decoder K/V across its samples.

`sample_decode(num_decodes=n)` runs the decoder on b * n rows against the encoder output of the
b inputs (cross-attention K/V cached once per input). These tests hold it to a reference that
repeats every input n times explicitly (the batch the decoder saw before the K/V were shared),
to teacher-forced full-sequence log-probs, and check the cache shapes.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kard_jax.models import decoding, t5

VOCAB = 96  # > top_k = 50, so the top-k filter is active
EOS = 1
N = 5
SAMPLING = dict(num_decodes=N, top_k=50, top_p=0.95, eos_id=EOS)


def _config(scan_layers: bool = False) -> t5.T5Config:
    return t5.T5Config.from_preset(
        "tiny", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
        num_decoder_layers=2, scan_layers=scan_layers,
    )


def _params(seed: int = 0) -> dict:
    """Seeded unscanned init weights with the EOS logit raised, so that samples differ in length
    (some sequences end early at EOS, others run to max_decode_len)."""
    model = t5.T5(_config())
    tokens = jnp.ones((1, 4), jnp.int32)
    params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens, tokens)["params"])
    kernel = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = kernel.at[:, EOS].add(0.3)
    return params


def _inputs(seed: int = 0, lengths=(9, 3, 6)) -> jnp.ndarray:
    rng = np.random.RandomState(seed)
    tokens = rng.randint(2, VOCAB, (len(lengths), max(lengths)))
    tokens[np.arange(max(lengths))[None, :] >= np.array(lengths)[:, None]] = 0
    return jnp.asarray(tokens, jnp.int32)


def _model_and_params(scan_layers: bool):
    params = _params()
    return t5.T5(_config(scan_layers)), (t5.stack_layers(params) if scan_layers else params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_shared_cross_attention_equals_explicitly_expanded_batch(scan_layers):
    model, params = _model_and_params(scan_layers)
    enc = _inputs()
    b, max_len = enc.shape[0], 10
    repeated = jnp.repeat(enc, N, axis=0)  # row i*N + j = input i

    # One raw key per input: sample j of input i uses fold_in(key_i, j).
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(100, 100 + b))
    tokens, log_probs = decoding.sample_decode(model, params, enc, keys, max_decode_len=max_len, **SAMPLING)
    ref_keys = jnp.stack([jax.random.fold_in(keys[i], j) for i in range(b) for j in range(N)])
    ref_tokens, ref_log_probs = decoding.sample_decode(
        model, params, repeated, ref_keys, max_decode_len=max_len, **{**SAMPLING, "num_decodes": 1}
    )
    assert tokens.shape == (b, N, max_len) and log_probs.shape == (b, N)
    np.testing.assert_array_equal(np.asarray(tokens).reshape(b * N, max_len), np.asarray(ref_tokens)[:, 0])
    np.testing.assert_allclose(np.asarray(log_probs).reshape(-1), np.asarray(ref_log_probs)[:, 0], rtol=1e-5, atol=1e-5)

    # One key for the whole batch: the same draws as the expanded batch with that key.
    key = jax.random.PRNGKey(7)
    tokens1, log_probs1 = decoding.sample_decode(model, params, enc, key, max_decode_len=max_len, **SAMPLING)
    ref1, ref_lp1 = decoding.sample_decode(
        model, params, repeated, key, max_decode_len=max_len, **{**SAMPLING, "num_decodes": 1}
    )
    np.testing.assert_array_equal(np.asarray(tokens1).reshape(b * N, max_len), np.asarray(ref1)[:, 0])
    np.testing.assert_allclose(np.asarray(log_probs1).reshape(-1), np.asarray(ref_lp1)[:, 0], rtol=1e-5, atol=1e-5)

    # The test exercises what it claims: samples of one input differ, and some (not all) stop early.
    flat = np.asarray(tokens).reshape(b * N, max_len)
    assert all(len({tuple(s) for s in np.asarray(tokens)[i]}) > 1 for i in range(b))
    ended = (flat == EOS).any(axis=1)
    assert ended.any() and not ended.all()


def test_sampled_log_probs_equal_teacher_forced_full_decoder():
    """Independent of the cache: rescoring each sample with the full (non-incremental) decoder
    on the repeated inputs gives the returned log-probs (sum up to and including EOS)."""
    model, params = _model_and_params(False)
    enc = _inputs(seed=1)
    b, max_len = enc.shape[0], 10
    tokens, log_probs = decoding.sample_decode(
        model, params, enc, jax.random.PRNGKey(3), max_decode_len=max_len, **SAMPLING
    )
    flat = np.asarray(tokens).reshape(b * N, max_len)
    logits = model.apply({"params": params}, jnp.repeat(enc, N, axis=0), t5.shift_right(jnp.asarray(flat)))
    token_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, axis=-1)), flat[..., None], axis=-1)[..., 0]
    is_eos = flat == EOS
    after_eos = np.cumsum(is_eos, axis=1) - is_eos > 0
    want = np.where(after_eos, 0.0, token_lp).sum(axis=1)
    np.testing.assert_allclose(np.asarray(log_probs).reshape(-1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cross_attention_cache_is_per_input_not_per_sample(scan_layers):
    model, params = _model_and_params(scan_layers)
    cfg = model.config
    b, enc_len, max_len = 3, 9, 10
    cache = t5.init_cache(model, params, b, enc_len, max_len, num_decodes=N)
    encoded = jax.ShapeDtypeStruct((b, enc_len, cfg.d_model), jnp.float32)
    enc_tokens = jax.ShapeDtypeStruct((b, enc_len), jnp.int32)
    token = jax.ShapeDtypeStruct((b * N, 1), jnp.int32)

    def first_step(cache, encoded, enc_tokens, token):
        return model.apply({"params": params, "cache": cache}, encoded, enc_tokens, token,
                           method=t5.T5.decode, decode=True, mutable=["cache"])

    logits, mutated = jax.eval_shape(first_step, cache, encoded, enc_tokens, token)
    assert logits.shape == (b * N, 1, VOCAB)
    dec = mutated["cache"]["decoder"]
    layers = [dec["layers"]] if scan_layers else [dec[f"layers_{i}"] for i in range(cfg.num_decoder_layers)]
    lead = (cfg.num_decoder_layers,) if scan_layers else ()
    h, kv = cfg.num_heads, cfg.d_kv
    for layer in layers:
        cross, self_attn = layer["encoder_decoder_attention"], layer["self_attention"]
        assert cross["cached_key"].shape == lead + (b, h, kv, enc_len)
        assert cross["cached_value"].shape == lead + (b, h, enc_len, kv)
        # The self-attention cache: per decoder row, in the layouts its einsums read.
        assert self_attn["cached_key"].shape == lead + (b * N, h, kv, max_len)
        assert self_attn["cached_value"].shape == lead + (b * N, h, max_len, kv)


def test_decoder_batch_must_be_a_multiple_of_encoder_batch():
    model, params = _model_and_params(False)
    encoded = jnp.zeros((3, 5, model.config.d_model))
    with pytest.raises(ValueError, match="not a multiple of encoder batch 3"):
        model.apply({"params": params}, encoded, jnp.ones((3, 5), jnp.int32), jnp.zeros((4, 6), jnp.int32),
                    method=t5.T5.decode, decode=True, mutable=["cache"])


def test_sort_free_top_k_and_top_p_masks_equal_a_numpy_sort():
    """top_k_mask / top_p_mask find their cutoffs by bisection over the float bits (no sort);
    the kept sets equal a plain numpy sort-and-cumsum reference, ties and negatives included."""
    rng = np.random.RandomState(0)
    for scale in (0.3, 1.0, 3.0, 10.0):
        logits = (rng.standard_normal((16, 300)) * scale).astype(np.float32)
        logits[:, :20] = np.round(logits[:, :20])  # exact ties
        for k in (1, 7, 50, 299):
            kth = -np.sort(-logits, axis=-1)[:, k - 1 : k]
            got = np.isfinite(np.asarray(decoding.top_k_mask(jnp.asarray(logits), k)))
            np.testing.assert_array_equal(got, logits >= kth)
        for p in (0.05, 0.5, 0.9, 0.95):
            desc = -np.sort(-logits.astype(np.float64), axis=-1)
            probs = np.exp(desc - desc[:, :1]) / np.exp(desc - desc[:, :1]).sum(-1, keepdims=True)
            num_kept = np.maximum(((np.cumsum(probs, -1) - probs) < p).sum(-1), 1)
            cutoff = desc[np.arange(16), num_kept - 1][:, None]
            got = np.isfinite(np.asarray(decoding.top_p_mask(jnp.asarray(logits), p)))
            np.testing.assert_array_equal(got, logits >= cutoff, err_msg=f"scale {scale} top_p {p}")


def test_top_k_first_filter_equals_the_vocabulary_masks():
    """filter_logits with 0 < top_k < vocab takes both cutoffs from lax.top_k's k values; the
    filtered logits equal top_p_mask(top_k_mask(.)) over the whole vocabulary (the bisections
    checked against numpy above), ties at the k-th value and at the top-p cutoff included."""
    rng = np.random.RandomState(1)
    for scale in (0.3, 1.0, 3.0, 10.0):
        logits = (rng.standard_normal((16, 300)) * scale).astype(np.float32)
        logits[:, :40] = np.round(logits[:, :40])  # exact ties, some at the k-th value
        logits[0, :] = 1.0  # a row that is all one tie
        # No -0.0: the bisections order -0.0 below +0.0 (float bits), the top-k path (and
        # transformers' torch comparisons) treat them as the same logit.
        logits = logits + np.float32(0.0)
        for temperature in (1.0, 0.7):
            for k in (1, 7, 50, 299):
                for p in (0.05, 0.5, 0.9, 0.95, 1.0):
                    got = decoding.filter_logits(jnp.asarray(logits), temperature=temperature, top_k=k, top_p=p)
                    scaled = jnp.asarray(logits) / temperature
                    want = decoding.top_p_mask(decoding.top_k_mask(scaled, k), p)
                    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), np.isfinite(np.asarray(want)),
                                                  err_msg=f"scale {scale} T {temperature} k {k} p {p}")
                    finite = np.isfinite(np.asarray(want))
                    np.testing.assert_array_equal(np.asarray(got)[finite], np.asarray(want)[finite])
