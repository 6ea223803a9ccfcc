"""The model contract the trainer relies on (t5x `models.BaseModel`), and the encoder-decoder model.

The trainer only calls `get_initial_variables`, `loss_fn`, `eval_fn` and `batch_tokens`; it
never looks at feature names. A model that reports `aux[LOSS_DENOMINATOR]` (e.g. the number of
target tokens) gets microbatch gradients combined exactly as one big batch would: the trainer
weights each microbatch's mean loss (and every other aux metric) by its denominator.
"""
from __future__ import annotations

import abc
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from kard_jax.models import losses

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]

# aux key: the weight of a batch's mean loss (sum of loss weights); summed, not averaged.
LOSS_DENOMINATOR = "loss_denominator"


class BaseModel(abc.ABC):
    """Wraps a flax module with its loss, evaluation, prediction and scoring."""

    #: feature name -> dtype of the inputs `get_initial_variables` needs.
    INPUT_FEATURES: Mapping[str, Any] = {}

    def __init__(self, module: nn.Module):
        self.module = module

    @abc.abstractmethod
    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]) -> PyTree:
        """Freshly initialised variables (params as `nn.Partitioned` boxes carrying logical axes)."""

    @abc.abstractmethod
    def loss_fn(self, params: PyTree, batch: Batch, dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
        """(scalar loss to minimise, aux metrics); dropout is on iff `dropout_rng` is not None."""

    def eval_fn(self, params: PyTree, batch: Batch) -> tuple[Array, dict[str, Array]]:
        """The loss and metrics without dropout."""
        return self.loss_fn(params, batch, None)

    @abc.abstractmethod
    def predict_batch(self, params: PyTree, batch: Batch, **kwargs: Any) -> Array:
        """Model predictions (decoded tokens, scores, ...) for a batch."""

    @abc.abstractmethod
    def score_batch(self, params: PyTree, batch: Batch) -> Array:
        """[batch] log-likelihood of each example's targets."""

    def batch_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Token positions processed per batch (for tokens/s): every 2-D integer feature's size."""
        return int(sum(np.size(v) for v in batch.values()
                       if np.ndim(v) == 2 and np.issubdtype(np.asarray(v).dtype, np.integer)))


class EncoderDecoderModel(BaseModel):
    """Seq2seq model over t5x EncDec feature-converter features.

    Batch keys: `encoder_input_tokens` [b, l], `decoder_input_tokens` [b, t] (targets shifted
    right), `decoder_target_tokens` [b, t], `decoder_loss_weights` [b, t] (1 on real target
    tokens, 0 on padding). The loss is the token mean of cross-entropy (+ optional z-loss,
    label smoothing) over the weighted target tokens.
    """

    INPUT_FEATURES = {"encoder_input_tokens": jnp.int32, "decoder_input_tokens": jnp.int32}

    def __init__(self, module: nn.Module, *, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__(module)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]) -> PyTree:
        enc = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
        dec = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
        return self.module.init(rng, enc, dec, enable_dropout=False)

    def batch_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Input plus target token positions (padding included), the usual seq2seq throughput unit."""
        return int(np.size(batch["encoder_input_tokens"]) + np.size(batch["decoder_target_tokens"]))

    def _logits(self, params: PyTree, batch: Batch, dropout_rng: Array | None) -> Array:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            enable_dropout=dropout_rng is not None, rngs=rngs,
        )

    def loss_fn(self, params: PyTree, batch: Batch, dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
        logits = self._logits(params, batch, dropout_rng)
        r = losses.weighted_cross_entropy(
            logits, batch["decoder_target_tokens"], batch.get("decoder_loss_weights"),
            label_smoothing=self.label_smoothing, z_loss=self.z_loss,
        )
        loss = losses.safe_divide(r.loss_sum, r.weight_sum)
        aux = {
            "loss": loss,
            "z_loss": losses.safe_divide(r.z_loss_sum, r.weight_sum),
            "accuracy": losses.safe_divide(r.correct_sum, r.weight_sum),
            LOSS_DENOMINATOR: r.weight_sum,
        }
        return loss, aux

    def score_batch(self, params: PyTree, batch: Batch) -> Array:
        """Sum over target tokens (weight > 0) of log p(target token), per example."""
        logits = self._logits(params, batch, None)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_ll = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = batch["decoder_target_tokens"] > 0
        return jnp.sum(token_ll * (weights > 0), axis=-1)

    def predict_batch(
        self,
        params: PyTree,
        batch: Batch,
        *,
        max_decode_len: int | None = None,
        rng: Array | None = None,
        num_decodes: int = 1,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_id: int | None = None,
    ) -> Array:
        """Greedy decoding when `rng` is None or temperature is 0; else `num_decodes` samples.

        Returns [b, max_decode_len] tokens (greedy) or [b, num_decodes, max_decode_len] (samples).
        """
        from kard_jax.models import decoding  # written separately; imported lazily

        if max_decode_len is None:
            max_decode_len = batch["decoder_target_tokens"].shape[1]
        if eos_id is None:
            eos_id = self.module.config.eos_token_id
        if rng is None or temperature == 0.0:
            return decoding.greedy_decode(
                self.module, params, batch["encoder_input_tokens"], max_decode_len=max_decode_len, eos_id=eos_id
            )
        tokens, _ = decoding.sample_decode(
            self.module, params, batch["encoder_input_tokens"], rng, max_decode_len=max_decode_len,
            num_decodes=num_decodes, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
        )
        return tokens
