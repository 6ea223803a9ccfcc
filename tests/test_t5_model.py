"""Model-level checks that need no reference implementation: axes, caching, presets, imports."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from kard_jax.models import t5

ENC = np.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]], np.int32)
DEC = np.array([[0, 3, 4, 5], [0, 6, 7, 0]], np.int32)


def _config(**kw):
    return t5.preset_config("tiny", vocab_size=100, d_model=32, d_kv=8, d_ff=64, **kw)


@pytest.mark.parametrize("kw", [{}, {"feed_forward_proj": "relu", "tie_word_embeddings": True}])
def test_every_parameter_has_logical_axes(kw):
    model = t5.T5(_config(**kw))
    variables = model.init(jax.random.PRNGKey(0), ENC, DEC)
    boxed = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    for leaf in boxed:
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    params = nn.meta.unbox(variables)["params"]
    assert t5.param_count(params) == model.config.num_params()
    assert ("logits_dense" in params["decoder"]) == (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("kw", [{}, {"feed_forward_proj": "relu", "tie_word_embeddings": True}])
def test_cached_decoding_matches_full_sequence(kw):
    model = t5.T5(_config(**kw))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), ENC, DEC))["params"]
    full = model.apply({"params": params}, ENC, DEC)
    encoded = model.apply({"params": params}, ENC, method=t5.T5.encode)
    cache = t5.init_cache(model, params, ENC.shape[0], ENC.shape[1], DEC.shape[1])
    steps = []
    for i in range(DEC.shape[1]):
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, encoded, ENC, DEC[:, i : i + 1],
            decode=True, method=t5.T5.decode, mutable=["cache"],
        )
        cache = mutated["cache"]
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_padding_does_not_change_unpadded_outputs():
    model = t5.T5(_config())
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(2), ENC, DEC))["params"]
    short = model.apply({"params": params}, ENC[1:, :3], DEC[1:, :3])
    padded = model.apply({"params": params}, ENC[1:], DEC[1:])
    np.testing.assert_allclose(padded[:, :3], short, atol=1e-5)


def test_remat_gives_identical_gradients():
    cfg = _config()
    params = nn.meta.unbox(t5.T5(cfg).init(jax.random.PRNGKey(3), ENC, DEC))["params"]
    import dataclasses

    grads = [
        jax.grad(lambda p, m=t5.T5(dataclasses.replace(cfg, remat_policy=r)): m.apply({"params": p}, ENC, DEC).sum())(params)
        for r in ("none", "full")
    ]
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_shift_right():
    np.testing.assert_array_equal(t5.shift_right(jnp.array([[4, 5, 1, 0]]), 0), [[0, 4, 5, 1]])


def test_unknown_preset_and_bad_fields_are_clear():
    with pytest.raises(ValueError, match="Unknown T5 preset 'huge'.*tiny"):
        t5.preset_config("huge")
    with pytest.raises(ValueError, match="d_modle"):
        t5.preset_config("tiny", d_modle=3)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.preset_config("tiny", feed_forward_proj="swiglu")


def test_models_package_does_not_import_tensorflow():
    code = (
        "import sys, kard_jax.models, kard_jax.models.t5; "
        "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
