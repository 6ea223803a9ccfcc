"""Autoregressive decoding for the Flax T5 with its KV cache (greedy and sampling).

Structure follows t5x `decoding.temperature_sample`: encode once, run the first step (which
puts the encoder-decoder attention K/V into the cache), then a `lax.while_loop` feeds one token
per step to `T5.decode(..., decode=True, mutable=["cache"])`. The loop stops
as soon as every sequence has produced `eos_id`; every token after a sequence's EOS is pad (0).
`num_decodes` samples per input (self-consistency decoding) share each input's encoder work:
the encoder runs once per input, and the encoder-decoder attention K/V (computed on the first
step and cached) are stored once per input, [b, ...], and read by all of its samples (the
decoder queries of the samples attend to them together, `t5.MultiHeadAttention`). Only the
decoder state is per sample: the self-attention cache, tokens, log-probs and rng have
b * num_decodes rows, rows i*n .. i*n+n-1 being the samples of input i (t5x
`flat_batch_beam_expand` order). The encoder output is not repeated, so neither the first
step's K/V projections nor every step's cross-attention memory traffic grows with num_decodes.

On the CPU both functions compile with `cpu_runtime.decode_compiler_options()` (by default XLA's
own dot emitter for the decoder's small-batch matmuls; see `cpu_runtime`; gin:
`cpu_runtime.decode_compiler_options.options`); elsewhere with XLA's defaults.
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

from kard_jax import cpu_runtime
from kard_jax.models import t5

_DECODE_OPTIONS_SETTING = "cpu_runtime.decode_compiler_options.options"  # named in a bad option's error

PyTree = Any

# Temperatures at or below this are greedy (exponentiating 1/T near 0 is numerically useless).
MIN_TEMPERATURE = 1e-4


@flax.struct.dataclass
class _LoopState:
    """Decoding loop carry; B = batch * num_decodes, L = max_decode_len (the cache's
    encoder-decoder K/V have the un-expanded batch)."""

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


def _ordered_keys(x: jnp.ndarray) -> jnp.ndarray:
    """float32 -> uint32 keys with the same order (sign-magnitude bits made monotone)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key(ok, rows: tuple[int, ...]) -> jnp.ndarray:
    """Per row, the largest uint32 key t with ok(t) [rows..., 1] true, for an `ok` that is true
    at 0 and monotone (true up to some key, false above): built bit by bit, 32 passes. An exact
    order statistic without sorting the vocabulary (XLA:CPU's sort of a 32k vocabulary costs more
    than a decoder step). `filter_logits` uses it only for top-p without top-k."""
    def body(i, ans):
        cand = ans | (jnp.uint32(1) << (jnp.uint32(31) - i.astype(jnp.uint32)))
        return jnp.where(ok(cand), cand, ans)

    return lax.fori_loop(0, 32, body, jnp.zeros(rows + (1,), jnp.uint32))


def top_k_mask(logits: jnp.ndarray, top_k: int) -> jnp.ndarray:
    """Sets logits below the k-th largest (per row) to -inf; top_k <= 0 or >= vocab: no-op."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    keys = _ordered_keys(logits)
    # The k-th largest: the largest key with at least k logits at or above it.
    kth_largest = _largest_key(lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) >= top_k, logits.shape[:-1])
    return jnp.where(keys < kth_largest, -jnp.inf, logits)


def top_p_mask(logits: jnp.ndarray, top_p: float) -> jnp.ndarray:
    """Nucleus filter: keeps the smallest set of highest logits whose probability mass reaches
    `top_p` (always at least the top token), sets the rest to -inf; top_p >= 1: no-op."""
    if top_p >= 1.0:
        return logits
    keys = _ordered_keys(logits)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    # The cutoff: the largest key whose logits at or above it hold at least top_p of the mass
    # (= the value of the last token kept when adding tokens in descending order until the
    # mass reaches top_p; ties at the cutoff are all kept).
    cutoff = _largest_key(
        lambda t: jnp.sum(jnp.where(keys >= t, probs, 0.0), axis=-1, keepdims=True) >= top_p, logits.shape[:-1]
    )
    return jnp.where(keys < cutoff, -jnp.inf, logits)


def _top_k_threshold(scaled: jnp.ndarray, top_k: int, top_p: float):
    """For 0 < top_k < vocab: (values [..., k] descending, their indices, kth [..., 1], threshold
    [..., 1]); the filtered logits are exactly `scaled >= threshold` (see `filter_logits`)."""
    values, indices = lax.top_k(scaled, top_k)  # [..., k], descending
    # The k-th value as a min, not values[..., -1:]: XLA:CPU rewrites top_k + that slice into a
    # full sort of the vocabulary (300 ms at [40, 32128] against 3 ms for top_k).
    kth = jnp.min(values, axis=-1, keepdims=True)
    if top_p >= 1.0:
        return values, indices, kth, kth
    masked = jnp.where(scaled >= kth, scaled, -jnp.inf)
    probs = jnp.exp(values - jax.nn.logsumexp(masked, axis=-1, keepdims=True))  # [..., k]
    # mass[i]: probability of the filtered row's logits >= values[i]; at the k-th value, all of it.
    at_or_above = values[..., None, :] >= values[..., :, None]  # [..., i, j]: values[j] >= values[i]
    mass = jnp.sum(jnp.where(at_or_above, probs[..., None, :], 0.0), axis=-1)
    mass = jnp.where(values == kth, 1.0, mass)
    cutoff = jnp.max(jnp.where(mass >= top_p, values, -jnp.inf), axis=-1, keepdims=True)
    return values, indices, kth, jnp.maximum(kth, cutoff)


def filter_logits(logits: jnp.ndarray, *, temperature: float, top_k: int, top_p: float) -> jnp.ndarray:
    """The logits actually sampled from: divided by temperature, then top-k, then top-p
    (= `top_p_mask(top_k_mask(scaled, top_k), top_p)`, transformers' warpers' semantics).

    With 0 < top_k < vocab both cutoffs come from `lax.top_k`'s k values instead of bisections
    over the vocabulary (self-consistency decoding runs this every step on b * num_decodes rows):
    the k-th value is top-k's cutoff (every logit tied with it kept, as transformers does), and
    top-p's is the largest of the k values whose logits at or above it hold `top_p` of the
    top-k-filtered mass (normalised over the whole filtered row, ties beyond k included)."""
    scaled = logits.astype(jnp.float32) / temperature
    if not 0 < top_k < scaled.shape[-1]:
        return top_p_mask(scaled, top_p)
    threshold = _top_k_threshold(scaled, top_k, top_p)[3]
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _categorical(rng: jnp.ndarray, logits: jnp.ndarray, per_row: bool) -> jnp.ndarray:
    """One draw per row of [B, n] logits: with `per_row`, row i uses key rng[i]."""
    if per_row:
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(rng, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def sample_tokens(rng: jnp.ndarray, logits: jnp.ndarray, *, temperature: float, top_k: int, top_p: float,
                  per_row: bool = False) -> jnp.ndarray:
    """[B] token ids drawn from `filter_logits(logits, ...)` ([B, vocab] logits).

    With 0 < top_k < vocab every token the filter keeps is one of `lax.top_k`'s k candidates
    (unless a row has logits tied with its k-th value beyond k), so the draw is among the k
    candidates: k Gumbel variates per row instead of one per vocabulary entry (the full-vocabulary
    draw was 20 ms of a 160 ms step at 40 rows x 32128 on 2 CPU cores). The distribution is the
    same; the random numbers are not those of a full-vocabulary draw. Batches with such ties
    draw over the whole filtered vocabulary instead (exact in every case)."""
    scaled = logits.astype(jnp.float32) / temperature
    if not 0 < top_k < scaled.shape[-1]:
        return _categorical(rng, top_p_mask(scaled, top_p), per_row).astype(jnp.int32)
    values, indices, kth, threshold = _top_k_threshold(scaled, top_k, top_p)

    def among_candidates():
        pick = _categorical(rng, jnp.where(values >= threshold, values, -jnp.inf), per_row)
        return jnp.take_along_axis(indices, pick[:, None], axis=-1)[:, 0]

    def over_vocabulary():
        return _categorical(rng, jnp.where(scaled >= threshold, scaled, -jnp.inf), per_row)

    ties_beyond_k = jnp.any(jnp.sum(scaled >= kth, axis=-1) > top_k)
    return lax.cond(ties_beyond_k, over_vocabulary, among_candidates).astype(jnp.int32)


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
    # Not expanded: the decoder's b * num_decodes rows share each input's encoder output and
    # cross-attention K/V (t5.MultiHeadAttention groups the rows by input).
    inputs, encoder_len = encoder_input_tokens.shape
    batch = inputs * num_decodes
    cache = t5.init_cache(model, params, inputs, encoder_len, max_decode_len, num_decodes=num_decodes)
    greedy = temperature <= MIN_TEMPERATURE
    per_row = rng.ndim == 2  # one raw key per input row
    if per_row:
        if rng.shape[0] != inputs:
            raise ValueError(f"per-row rng must have one key per input, got {rng.shape[0]} keys for "
                             f"{inputs} inputs")
        if num_decodes > 1:  # sample j of input i: fold_in(key_i, j)
            rng = jax.vmap(jax.random.fold_in)(flat_batch_expand(rng, num_decodes),
                                               jnp.tile(jnp.arange(num_decodes, dtype=jnp.uint32), inputs))

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
            token = sample_tokens(step_rng, logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                  per_row=per_row)
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


@functools.partial(cpu_runtime.cpu_jit, options=cpu_runtime.decode_compiler_options, setting=_DECODE_OPTIONS_SETTING,
                   static_argnames=("model", "max_decode_len", "eos_id"))
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
    cpu_runtime.cpu_jit, options=cpu_runtime.decode_compiler_options, setting=_DECODE_OPTIONS_SETTING,
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
    Each input is encoded once and its encoder-decoder attention K/V are cached once and shared
    by its `num_decodes` samples (self-consistency decoding; see the module docstring).
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
