"""Autoregressive decoding for the Flax T5 with its KV cache (greedy and sampling).

Structure follows t5x `decoding.temperature_sample`: encode once, run the first step (which
puts the encoder-decoder attention K/V into the cache), then a `lax.while_loop` feeds one token
per step to `T5.decode(..., decode=True, mutable=["cache"])`. The loop stops
as soon as every sequence has produced `eos_id`; every token after a sequence's EOS is pad (0).
`num_decodes` samples per input repeat the encoded inputs along the batch (t5x
`flat_batch_beam_expand`), so the encoder runs once per input, not once per sample.

Every configuration argument is static (one compilation per configuration); the arrays
(params, tokens, rng) are traced, so the functions run under any mesh / input sharding.
`sample_decode` also takes one PRNG key per input row ([b, 2]): each row's samples then depend
only on its own key, not on its batch, its position or the sharding (what sharded and
multi-host evaluation use to reproduce single-device samples).
"""
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax

from kard_jax.models import t5

PyTree = Any

# Temperatures at or below this are greedy (exponentiating 1/T near 0 is numerically useless).
MIN_TEMPERATURE = 1e-4


@flax.struct.dataclass
class _LoopState:
    """Decoding loop carry; B = batch * num_decodes, L = max_decode_len."""

    step: jnp.ndarray  # [] int32, index of the token being produced
    cur_token: jnp.ndarray  # [B, 1] int32, the decoder input of this step
    sequences: jnp.ndarray  # [B, L] int32, produced tokens (0 after EOS / not yet produced)
    cache: PyTree  # flax "cache" collection
    ended: jnp.ndarray  # [B] bool, EOS already produced
    rng: jnp.ndarray  # PRNG key, or [B, 2] one key per row
    log_prob: jnp.ndarray  # [B] float32, sum of model log-probs of produced tokens


def flat_batch_expand(x: jnp.ndarray, num_decodes: int) -> jnp.ndarray:
    """[b, ...] -> [b * num_decodes, ...], each row repeated `num_decodes` times in a row."""
    return jnp.repeat(x, num_decodes, axis=0)


def top_k_mask(logits: jnp.ndarray, top_k: int) -> jnp.ndarray:
    """Sets logits below the k-th largest (per row) to -inf; top_k <= 0 or >= vocab: no-op."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth_largest, -jnp.inf, logits)


def top_p_mask(logits: jnp.ndarray, top_p: float) -> jnp.ndarray:
    """Nucleus filter: keeps the smallest set of highest logits whose probability mass reaches
    `top_p` (always at least the top token), sets the rest to -inf; top_p >= 1: no-op."""
    if top_p >= 1.0:
        return logits
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def filter_logits(logits: jnp.ndarray, *, temperature: float, top_k: int, top_p: float) -> jnp.ndarray:
    """The logits actually sampled from: divided by temperature, then top-k, then top-p."""
    scaled = logits.astype(jnp.float32) / temperature
    return top_p_mask(top_k_mask(scaled, top_k), top_p)


def _decode_loop(
    model: t5.T5,
    params: PyTree,
    encoder_input_tokens: jnp.ndarray,
    rng: jnp.ndarray,
    *,
    max_decode_len: int,
    num_decodes: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_id: int,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Shared body of greedy/sample decoding; returns ([B, L] tokens, [B] log-probs)."""
    if max_decode_len < 1:
        raise ValueError(f"max_decode_len must be >= 1, got {max_decode_len}")
    encoder_input_tokens = encoder_input_tokens.astype(jnp.int32)
    encoded = model.apply({"params": params}, encoder_input_tokens, method=t5.T5.encode)
    if num_decodes > 1:
        encoded = flat_batch_expand(encoded, num_decodes)
        encoder_input_tokens = flat_batch_expand(encoder_input_tokens, num_decodes)
    batch, encoder_len = encoder_input_tokens.shape
    cache = t5.init_cache(model, params, batch, encoder_len, max_decode_len)
    greedy = temperature <= MIN_TEMPERATURE
    per_row = rng.ndim == 2  # one raw key per input row
    if per_row:
        if rng.shape[0] * num_decodes != batch:
            raise ValueError(f"per-row rng must have one key per input, got {rng.shape[0]} keys for "
                             f"{batch // num_decodes} inputs")
        if num_decodes > 1:  # sample j of input i: fold_in(key_i, j)
            rng = jax.vmap(jax.random.fold_in)(flat_batch_expand(rng, num_decodes),
                                               jnp.tile(jnp.arange(num_decodes, dtype=jnp.uint32), batch // num_decodes))

    def cond_fn(state: _LoopState) -> jnp.ndarray:
        return (state.step < max_decode_len) & ~jnp.all(state.ended)

    def body_fn(state: _LoopState) -> _LoopState:
        logits, mutated = model.apply(
            {"params": params, "cache": state.cache},
            encoded,
            encoder_input_tokens,
            state.cur_token,
            method=t5.T5.decode,
            decode=True,
            mutable=["cache"],
        )
        logits = logits[:, -1, :].astype(jnp.float32)
        if per_row:
            keys = jax.vmap(jax.random.split)(state.rng)
            rng, step_rng = keys[:, 0], keys[:, 1]
        else:
            rng, step_rng = jax.random.split(state.rng)
        if greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            if per_row:
                token = jax.vmap(lambda k, row: jax.random.categorical(k, row))(step_rng, filtered)
            else:
                token = jax.random.categorical(step_rng, filtered, axis=-1)
            token = token.astype(jnp.int32)
        token_log_prob = jnp.take_along_axis(
            jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1
        )[:, 0]
        token = jnp.where(state.ended, 0, token)
        return _LoopState(
            step=state.step + 1,
            cur_token=token[:, None],
            sequences=lax.dynamic_update_slice(state.sequences, token[:, None], (0, state.step)),
            cache=mutated["cache"],
            ended=state.ended | (token == eos_id),
            rng=rng,
            log_prob=state.log_prob + jnp.where(state.ended, 0.0, token_log_prob),
        )

    init = _LoopState(
        step=jnp.zeros((), jnp.int32),
        cur_token=jnp.full((batch, 1), model.config.decoder_start_token_id, jnp.int32),
        sequences=jnp.zeros((batch, max_decode_len), jnp.int32),
        cache=cache,
        ended=jnp.zeros((batch,), jnp.bool_),
        rng=rng,
        log_prob=jnp.zeros((batch,), jnp.float32),
    )
    # The first step runs outside the loop: it adds the encoder-decoder K/V to the cache (the
    # loop carry must keep one structure), so the loop body only reads them.
    final = lax.while_loop(cond_fn, body_fn, body_fn(init))
    return final.sequences, final.log_prob


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len", "eos_id"))
def greedy_decode(
    model: t5.T5,
    params: PyTree,
    encoder_input_tokens: jnp.ndarray,
    *,
    max_decode_len: int,
    eos_id: int = 1,
) -> jnp.ndarray:
    """Greedy decoding: [b, l] int inputs (0 = padding) -> [b, max_decode_len] tokens.

    The decoder starts from `model.config.decoder_start_token_id`; the start token is not part
    of the output. Tokens after a sequence's `eos_id` are 0.
    """
    tokens, _ = _decode_loop(
        model, params, encoder_input_tokens, jax.random.PRNGKey(0),
        max_decode_len=max_decode_len, num_decodes=1, temperature=0.0, top_k=0, top_p=1.0,
        eos_id=eos_id,
    )
    return tokens


@functools.partial(
    jax.jit,
    static_argnames=("model", "max_decode_len", "num_decodes", "temperature", "top_k", "top_p", "eos_id"),
)
def sample_decode(
    model: t5.T5,
    params: PyTree,
    encoder_input_tokens: jnp.ndarray,
    rng: jnp.ndarray,
    *,
    max_decode_len: int,
    num_decodes: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = 1,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Temperature sampling with top-k then top-p (nucleus) filtering, `num_decodes` per input.

    Returns (tokens [b, num_decodes, max_decode_len], log_probs [b, num_decodes]); log_probs
    are the sums of the model's own log-probabilities (log_softmax of the unfiltered logits)
    of the produced tokens up to and including EOS. temperature <= 1e-4 decodes greedily.
    Samples stay in draw order (not sorted by log-prob); the same rng gives the same samples.
    `rng` is one PRNG key, or raw keys [b, 2] (one per input: `jax.random.PRNGKey` values), with
    which every input's samples depend only on its own key (not on the batch or its sharding).
    """
    if num_decodes < 1:
        raise ValueError(f"num_decodes must be >= 1, got {num_decodes}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    batch = encoder_input_tokens.shape[0]
    tokens, log_probs = _decode_loop(
        model, params, encoder_input_tokens, rng,
        max_decode_len=max_decode_len, num_decodes=num_decodes, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eos_id,
    )
    return (
        tokens.reshape(batch, num_decodes, max_decode_len),
        log_probs.reshape(batch, num_decodes),
    )
