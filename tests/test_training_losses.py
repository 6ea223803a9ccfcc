"""Losses, schedules, weight-decay masks and the encoder-decoder model's loss / score vs numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kard_jax.models import losses, t5
from kard_jax.models.base import LOSS_DENOMINATOR, EncoderDecoderModel
from kard_jax.training import optimizers


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_weighted_cross_entropy_matches_numpy_with_smoothing_and_z_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(3, 5))
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
    ls, zl = 0.1, 1e-3
    logp = _np_log_softmax(logits.astype(np.float64))
    soft = np.full((3, 5, 7), ls / 6)
    np.put_along_axis(soft, targets[..., None], 1 - ls, axis=-1)
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    entropy = -(soft * np.log(soft)).sum(-1)
    per_token = -(soft * logp).sum(-1) - entropy + zl * log_z**2
    r = losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                      label_smoothing=ls, z_loss=zl)
    np.testing.assert_allclose(r.loss_sum, (per_token * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(r.z_loss_sum, (zl * log_z**2 * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(r.weight_sum, weights.sum())
    correct = (logits.argmax(-1) == targets) * weights
    np.testing.assert_allclose(r.correct_sum, correct.sum())
    # Token mean = weighted sum / weight sum; the soft-target form agrees with the gather form.
    mean = losses.token_mean_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(mean, (-np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum()
                               / weights.sum(), rtol=1e-5)
    full, _ = losses.cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(soft, jnp.float32), zl)
    np.testing.assert_allclose(full, per_token + entropy, rtol=1e-5)
    assert float(losses.safe_divide(jnp.float32(3.0), jnp.float32(0.0))) == 0.0


def test_encoder_decoder_loss_and_score_match_numpy():
    cfg = t5.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_encoder_layers=1,
                      num_decoder_layers=1)
    model = EncoderDecoderModel(t5.T5(cfg))
    rng = np.random.default_rng(1)
    tgt = rng.integers(2, 32, size=(2, 6)).astype(np.int32)
    weights = np.ones((2, 6), np.float32)
    weights[1, 4:] = 0
    tgt[1, 4:] = 0
    batch = {
        "encoder_input_tokens": rng.integers(2, 32, size=(2, 5)).astype(np.int32),
        "decoder_input_tokens": np.asarray(t5.shift_right(jnp.asarray(tgt))),
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": weights,
    }
    params = jax.tree.map(np.asarray, jax.device_get(
        model.get_initial_variables(jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))["params"]
    logits = np.asarray(model.module.apply({"params": params}, batch["encoder_input_tokens"],
                                           batch["decoder_input_tokens"]), np.float64)
    token_ll = np.take_along_axis(_np_log_softmax(logits), tgt[..., None], -1)[..., 0]
    loss, aux = model.loss_fn(params, batch, None)
    np.testing.assert_allclose(loss, -(token_ll * weights).sum() / weights.sum(), rtol=1e-5)
    assert float(aux[LOSS_DENOMINATOR]) == weights.sum() == 10
    np.testing.assert_allclose(model.score_batch(params, batch), (token_ll * weights).sum(-1), rtol=1e-5)
    assert model.batch_tokens(batch) == 2 * 5 + 2 * 6


def test_schedules():
    c = optimizers.make_schedule("constant", learning_rate=1e-4)
    assert float(c(0)) == float(c(10_000)) == pytest.approx(1e-4)
    w = optimizers.make_schedule("linear_warmup", learning_rate=1e-3, warmup_steps=10)
    assert [float(w(s)) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    r = optimizers.make_schedule("rsqrt", learning_rate=0.01, warmup_steps=100)
    assert [float(r(s)) for s in (0, 100, 400)] == pytest.approx([0.01, 0.01, 0.005])
    cos = optimizers.make_schedule("cosine", learning_rate=1e-3, warmup_steps=10, decay_steps=110, end_value=1e-5)
    assert float(cos(10)) == pytest.approx(1e-3)
    assert float(cos(60)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-4)
    assert float(cos(110)) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="decay_steps"):
        optimizers.make_schedule("cosine", warmup_steps=10)
    with pytest.raises(ValueError, match="unknown schedule"):
        optimizers.make_schedule("exp")


def test_weight_decay_mask_skips_norms_and_vectors():
    params = {"layer": {"mlp": {"kernel": jnp.ones((2, 2))}, "pre_mlp_layer_norm": {"scale": jnp.ones(2)}},
              "bias": jnp.ones(2)}
    mask = optimizers.default_weight_decay_mask(params)
    assert mask == {"layer": {"mlp": {"kernel": True}, "pre_mlp_layer_norm": {"scale": False}}, "bias": False}
    opt = optimizers.adamw(0.1, weight_decay=0.5, clip_norm=None)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.tx.update(zero_grads, opt.tx.init(params), params)
    np.testing.assert_allclose(updates["layer"]["mlp"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    assert not np.any(updates["layer"]["pre_mlp_layer_norm"]["scale"])


def test_global_norm_clipping():
    opt = optimizers.adamw(1.0, clip_norm=1.0, b1=0.0, b2=0.0, eps=0.0)
    sgd_like = optimizers._with_clipping(optax.sgd(1.0), 1.0)
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([3.0, 4.0])}
    updates, _ = sgd_like.update(grads, sgd_like.init(params))
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)
    assert opt.learning_rate(0) == 1.0
