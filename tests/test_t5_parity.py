"""Logits parity of kard_jax's T5 with transformers' PyTorch T5ForConditionalGeneration, both ways:
HF random weights -> save_pretrained -> hf_io.load_hf_params -> our model, and our random
weights -> hf_io.export_hf -> from_pretrained -> torch. Padded batches with different lengths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from kard_jax import hf_io
from kard_jax.models import t5
from tests import t5_reference

TOLERANCE = 1e-4

CONFIGS = {
    # T5 v1.1 / Flan-T5 style; few buckets so that length 12 reaches the logarithmic buckets.
    "v1_1_gated_untied": t5.T5Config(
        vocab_size=160, d_model=48, d_kv=12, d_ff=96, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    ),
    # Original T5 style; default buckets, one more decoder layer than encoder layers.
    "original_relu_tied": t5.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=3,
        feed_forward_proj="relu", tie_word_embeddings=True,
    ),
}


def _batch(cfg: t5.T5Config, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder tokens (lengths 12 and 7, padded with 0) and shifted decoder inputs (lengths 6 and 3)."""
    rng = np.random.default_rng(seed)
    enc = np.zeros((2, 12), np.int32)
    targets = np.zeros((2, 6), np.int32)
    for row, (enc_len, dec_len) in enumerate([(12, 6), (7, 3)]):
        enc[row, :enc_len] = rng.integers(2, cfg.vocab_size, enc_len)
        targets[row, :dec_len] = rng.integers(2, cfg.vocab_size, dec_len)
    dec = np.asarray(t5.shift_right(jnp.asarray(targets), cfg.decoder_start_token_id))
    return enc, dec


def _our_logits(cfg: t5.T5Config, params, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
    return np.asarray(t5.T5(cfg).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_to_ours_logits_match(name, tmp_path):
    cfg = CONFIGS[name]
    hf_model = t5_reference.random_hf_model(cfg, seed=1)
    hf_model.save_pretrained(tmp_path / "hf")

    loaded_cfg, params = hf_io.load_hf_params(tmp_path / "hf")
    assert loaded_cfg == cfg

    # The loaded tree is exactly the model's own parameter tree.
    enc, dec = _batch(cfg, seed=2)
    init_params = meta.unbox(t5.T5(cfg).init(jax.random.PRNGKey(0), jnp.asarray(enc), jnp.asarray(dec))["params"])
    assert jax.tree.structure(params) == jax.tree.structure(init_params)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init_params)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))

    ours = _our_logits(cfg, params, enc, dec)
    theirs = t5_reference.torch_logits(hf_model, enc, dec)
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"{name} HF->ours max abs logits diff {diff:.3g} (logits scale {np.abs(theirs).max():.3g})")
    assert np.abs(theirs).max() > 1.0  # non-trivial weights
    assert diff <= TOLERANCE


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ours_to_hf_logits_match(name, tmp_path):
    cfg = CONFIGS[name]
    enc, dec = _batch(cfg, seed=3)
    params = meta.unbox(t5.T5(cfg).init(jax.random.PRNGKey(4), jnp.asarray(enc), jnp.asarray(dec))["params"])
    # Move the norm scales away from their all-ones init so a mis-mapped scale would show.
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 1000))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * (1.0 + 0.2 * jax.random.normal(next(keys), x.shape)) if path[-1].key == "scale" else x,
        params,
    )

    hf_model = t5_reference.to_torch_model(params, cfg, tmp_path)
    ours = _our_logits(cfg, params, enc, dec)
    theirs = t5_reference.torch_logits(hf_model, enc, dec)
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"{name} ours->HF max abs logits diff {diff:.3g} (logits scale {np.abs(theirs).max():.3g})")
    assert np.abs(theirs).max() > 1.0
    assert diff <= TOLERANCE

    # Padding is really masked: the short row alone, unpadded, gives the same logits.
    alone = _our_logits(cfg, params, enc[1:, :7], dec[1:, :3])
    np.testing.assert_allclose(ours[1:, :3], alone, atol=TOLERANCE)
