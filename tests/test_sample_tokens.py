"""`decoding.sample_tokens` draws among the top-k candidates only; the reference is the softmax
of `filter_logits` over the whole vocabulary (what a full-vocabulary draw samples from)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kard_jax.models import decoding

DRAWS = 20000


def _frequencies(logits, per_row, **kw):
    """Empirical distribution of DRAWS draws for each row of `logits` [rows, vocab]."""
    rows, vocab = logits.shape
    keys = jax.random.split(jax.random.PRNGKey(0), DRAWS)

    def draw(key):
        rng = jax.random.split(key, rows) if per_row else key
        return decoding.sample_tokens(rng, logits, per_row=per_row, **kw)

    tokens = np.asarray(jax.jit(jax.vmap(draw))(keys))  # [DRAWS, rows]
    return np.stack([np.bincount(tokens[:, r], minlength=vocab) / DRAWS for r in range(rows)])


def _reference(logits, **kw):
    return np.asarray(jax.nn.softmax(decoding.filter_logits(logits, **kw), axis=-1))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (8, 0.8, 0.7), (3, 0.5, 1.3)])
def test_draws_follow_the_filtered_distribution(per_row, top_k, top_p, temperature):
    logits = jax.random.normal(jax.random.PRNGKey(1), (3, 40)) * 2.0
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    want, got = _reference(logits, **kw), _frequencies(logits, per_row, **kw)
    assert np.all(got[want == 0] == 0), "a token the filter removes was drawn"
    # Binomial standard error of a frequency is <= 0.5 / sqrt(DRAWS) = 0.0035; 5 of them.
    np.testing.assert_allclose(got, want, atol=0.018)


def test_ties_at_the_kth_value_beyond_k_are_drawn_too():
    # Row 0: the 2nd..5th largest are tied, so top_k=2 keeps 5 tokens (transformers' semantics);
    # only 2 of them are lax.top_k candidates, so this batch must draw over the vocabulary.
    logits = jnp.array([[3.0, 1.0, 1.0, 1.0, 1.0, -2.0, 0.0, -1.0],
                        [0.5, 2.0, -1.0, 0.0, 1.5, -3.0, 0.2, 0.1]])
    kw = dict(temperature=1.0, top_k=2, top_p=1.0)
    want, got = _reference(logits, **kw), _frequencies(logits, False, **kw)
    assert np.count_nonzero(want[0]) == 5
    assert np.all(got[want == 0] == 0)
    np.testing.assert_allclose(got, want, atol=0.018)


def test_without_top_k_the_whole_vocabulary_is_drawn_from():
    logits = jax.random.normal(jax.random.PRNGKey(2), (2, 30))
    kw = dict(temperature=1.0, top_k=0, top_p=0.9)
    np.testing.assert_allclose(_frequencies(logits, True, **kw), _reference(logits, **kw), atol=0.018)
