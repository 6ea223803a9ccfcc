"""kard_jax.models.decoding against transformers' PyTorch T5 and brute-force references."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation import logits_process

from kard_jax.models import decoding, t5
from tests import t5_reference

VOCAB = 48
EOS = 1


def _config(feed_forward_proj: str = "gated-gelu") -> t5.T5Config:
    return t5.T5Config.from_preset(
        "tiny", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=feed_forward_proj == "relu",
    )


def _random_params(model: t5.T5, seed: int, eos_boost: float, residual_gain: float = 1.0) -> dict:
    """Seeded normal weights, larger than the training init so that greedy outputs vary;
    `eos_boost` raises the EOS logit so that some (not all) sequences stop early, and
    `residual_gain` scales the attention/MLP outputs (a tied model otherwise repeats its input
    token, whose embedding dominates the residual stream)."""
    tokens = jnp.ones((1, 4), jnp.int32)
    shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)["params"])
    rng = np.random.RandomState(seed)

    def init(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("scale"):
            value = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
        elif name.endswith("out/kernel"):
            value = rng.standard_normal(leaf.shape) * (leaf.shape[0] * leaf.shape[1]) ** -0.5 * residual_gain
        elif name.endswith("wo/kernel"):
            value = rng.standard_normal(leaf.shape) * leaf.shape[0] ** -0.5 * residual_gain
        elif name.endswith("kernel") and "logits_dense" not in name:
            value = rng.standard_normal(leaf.shape) * leaf.shape[0] ** -0.5
        else:  # embedding, relative position biases, lm_head: unit variance
            value = rng.standard_normal(leaf.shape)
        return jnp.asarray(value, jnp.float32)

    params = jax.tree_util.tree_map_with_path(init, shapes)
    if "logits_dense" in params["decoder"]:
        kernel = params["decoder"]["logits_dense"]["kernel"]
        params["decoder"]["logits_dense"]["kernel"] = kernel.at[:, EOS].multiply(eos_boost)
    else:
        emb = params["token_embedder"]["embedding"]
        params["token_embedder"]["embedding"] = emb.at[EOS].multiply(eos_boost)
    return params


def _encoder_inputs(seed: int = 0, lengths=(11, 3, 7, 1, 11, 5, 9, 2)) -> jnp.ndarray:
    """A batch of different input lengths, padded with 0 (no EOS / pad inside the inputs)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(2, VOCAB, (len(lengths), max(lengths)))
    tokens[np.arange(max(lengths))[None, :] >= np.array(lengths)[:, None]] = 0
    return jnp.asarray(tokens, jnp.int32)


@pytest.fixture(scope="module")
def v11():
    cfg = _config("gated-gelu")
    model = t5.T5(cfg)
    return model, _random_params(model, seed=0, eos_boost=2.0, residual_gain=2.0)


def _full_logits(model, params, enc, decoder_inputs) -> np.ndarray:
    encoded = model.apply({"params": params}, enc, method=t5.T5.encode)
    return np.asarray(model.apply({"params": params}, encoded, enc, decoder_inputs, method=t5.T5.decode))


def test_kv_cache_logits_equal_full_decoder_logits():
    """Step-by-step cached logits = full-sequence logits, with the model's own (t5x) init."""
    model = t5.T5(_config("gated-gelu"))
    tokens = jnp.ones((1, 4), jnp.int32)
    params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(3), tokens, tokens)["params"])
    enc = _encoder_inputs()
    steps = 9
    dec = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (enc.shape[0], steps)), jnp.int32).at[:, 0].set(0)
    full = _full_logits(model, params, enc, dec)
    encoded = model.apply({"params": params}, enc, method=t5.T5.encode)
    cache = t5.init_cache(model, params, enc.shape[0], enc.shape[1], steps)
    step_fn = jax.jit(
        lambda cache, token: model.apply(
            {"params": params, "cache": cache}, encoded, enc, token, method=t5.T5.decode, decode=True, mutable=["cache"]
        )
    )
    for i in range(steps):
        logits, mutated = step_fn(cache, dec[:, i : i + 1])
        cache = mutated["cache"]
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, i], rtol=1e-5, atol=1e-5, err_msg=f"step {i}")


@pytest.mark.parametrize(
    "feed_forward_proj,eos_boost,residual_gain", [("gated-gelu", 2.0, 2.0), ("relu", 3.0, 4.0)]
)
def test_greedy_equals_transformers_generate(feed_forward_proj, eos_boost, residual_gain, tmp_path):
    cfg = _config(feed_forward_proj)
    model = t5.T5(cfg)
    params = _random_params(model, seed=0, eos_boost=eos_boost, residual_gain=residual_gain)
    enc = _encoder_inputs()
    max_len = 12
    ours = np.asarray(decoding.greedy_decode(model, params, enc, max_decode_len=max_len, eos_id=EOS))
    assert ours.shape == (enc.shape[0], max_len)

    hf = t5_reference.to_torch_model(params, cfg, tmp_path)  # through hf_io.export_hf
    enc_t = torch.from_numpy(np.asarray(enc, np.int64))
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=enc_t, attention_mask=(enc_t != 0).long(), do_sample=False, num_beams=1,
            max_new_tokens=max_len, eos_token_id=EOS, pad_token_id=0, decoder_start_token_id=0,
        ).numpy()
    assert np.all(theirs[:, 0] == 0)  # decoder start token
    theirs = theirs[:, 1:]
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert np.all(ours[:, theirs.shape[1]:] == 0)

    # The batch is non-trivial: some sequences end early with EOS (then pad), some run to the end,
    # and the outputs are not a single repeated token.
    has_eos = (ours == EOS).any(axis=1)
    eos_pos = np.where(has_eos, (ours == EOS).argmax(axis=1), max_len)
    assert has_eos.any() and not has_eos.all()
    assert (eos_pos < max_len - 1).any()
    after_eos = np.arange(max_len)[None, :] > eos_pos[:, None]
    assert np.all(ours[after_eos] == 0)
    assert len(np.unique(ours[ours > 1])) > 8


def test_zero_temperature_top_k_1_and_tiny_top_p_equal_greedy(v11):
    model, params = v11
    enc = _encoder_inputs()
    greedy = np.asarray(decoding.greedy_decode(model, params, enc, max_decode_len=12))
    rng = jax.random.PRNGKey(7)
    for kwargs in (dict(temperature=0.0), dict(temperature=1e-5), dict(top_k=1), dict(top_p=1e-6, temperature=1.5)):
        tokens, log_probs = decoding.sample_decode(model, params, enc, rng, max_decode_len=12, num_decodes=2, **kwargs)
        for j in range(2):
            np.testing.assert_array_equal(np.asarray(tokens)[:, j], greedy, err_msg=str(kwargs))


def _one_step_counts(model, params, enc, n, **kwargs):
    tokens, _ = decoding.sample_decode(
        model, params, enc, jax.random.PRNGKey(11), max_decode_len=1, num_decodes=n, **kwargs
    )
    return np.bincount(np.asarray(tokens)[0, :, 0], minlength=VOCAB)


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value, cells with expected count < 5 pooled into one."""
    expected = counts.sum() * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return scipy.stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("temperature,top_k,top_p", [(2.0, 6, 1.0), (1.5, 0, 0.7), (3.0, 10, 0.9)])
def test_one_step_sample_frequencies_match_filtered_softmax(v11, temperature, top_k, top_p):
    model, params = v11
    enc = _encoder_inputs()[:1]
    logits = _full_logits(model, params, enc, jnp.zeros((1, 1), jnp.int32))[0, 0].astype(np.float64) / temperature
    # Brute-force reference: keep the top_k highest, then the smallest prefix (by descending
    # probability) whose mass reaches top_p, renormalise.
    order = np.argsort(-logits)
    keep = np.zeros(VOCAB, bool)
    keep[order[: top_k or VOCAB]] = True
    probs = np.where(keep, np.exp(logits - logits.max()), 0.0)
    probs /= probs.sum()
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep[order[mass_before >= top_p]] = False
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    assert 2 < keep.sum() < VOCAB

    n = 6000
    counts = _one_step_counts(model, params, enc, n, temperature=temperature, top_k=top_k, top_p=top_p)
    assert counts.sum() == n
    assert counts[~keep].sum() == 0, "sampled a token outside the top-k / top-p set"
    assert _chi_square_p(counts[keep], probs[keep]) > 1e-3


def test_top_k_and_top_p_masks_match_transformers_warpers():
    logits = np.random.RandomState(3).standard_normal((16, 40)).astype(np.float32) * 3
    for top_k in (1, 5, 39):
        ours = np.isfinite(np.asarray(decoding.top_k_mask(jnp.asarray(logits), top_k)))
        theirs = logits_process.TopKLogitsWarper(top_k)(None, torch.from_numpy(logits)).isfinite().numpy()
        np.testing.assert_array_equal(ours, theirs)
    for top_p in (0.05, 0.5, 0.9, 0.999):
        ours = np.isfinite(np.asarray(decoding.top_p_mask(jnp.asarray(logits), top_p)))
        theirs = logits_process.TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).isfinite().numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_num_decodes_shapes_distinct_reproducible_and_log_probs(v11):
    model, params = v11
    enc = _encoder_inputs()[:4]
    max_len, n = 10, 5
    kwargs = dict(max_decode_len=max_len, num_decodes=n, temperature=1.0, top_k=20, top_p=0.95)
    tokens, log_probs = decoding.sample_decode(model, params, enc, jax.random.PRNGKey(5), **kwargs)
    tokens, log_probs = np.asarray(tokens), np.asarray(log_probs)
    assert tokens.shape == (4, n, max_len) and tokens.dtype == np.int32
    assert log_probs.shape == (4, n)
    for b in range(4):
        assert len({tuple(row) for row in tokens[b]}) > 1, f"input {b}: all {n} samples identical"

    again, again_lp = decoding.sample_decode(model, params, enc, jax.random.PRNGKey(5), **kwargs)
    np.testing.assert_array_equal(np.asarray(again), tokens)
    np.testing.assert_array_equal(np.asarray(again_lp), log_probs)
    other, _ = decoding.sample_decode(model, params, enc, jax.random.PRNGKey(6), **kwargs)
    assert not np.array_equal(np.asarray(other), tokens)

    # Tokens after EOS are pad; log_probs = model log-probabilities of the tokens up to EOS,
    # recomputed with the full (non-cached) decoder on the sampled sequences.
    flat = tokens.reshape(4 * n, max_len)
    has_eos = (flat == EOS).any(axis=1)
    eos_pos = np.where(has_eos, (flat == EOS).argmax(axis=1), max_len)
    assert has_eos.any()
    positions = np.arange(max_len)[None, :]
    assert np.all(flat[positions > eos_pos[:, None]] == 0)
    enc_rep = jnp.repeat(enc, n, axis=0)
    full = _full_logits(model, params, enc_rep, t5.shift_right(jnp.asarray(flat)))
    token_lp = np.take_along_axis(jax.nn.log_softmax(full, axis=-1), flat[..., None], axis=-1)[..., 0]
    expected = np.where(positions <= eos_pos[:, None], token_lp, 0.0).sum(axis=1)
    np.testing.assert_allclose(log_probs.reshape(-1), expected, rtol=1e-4, atol=1e-4)
