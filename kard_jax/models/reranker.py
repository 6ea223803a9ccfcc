"""KARD's neural reranker: a late-interaction (ColBERT-style) scorer over a T5 encoder.

score(query, passage) = sum over real query tokens of the max over real passage tokens of the
dot product of their L2-normalised, projected encoder outputs. The encoder reuses
`kard_jax.models.t5` with the student's parameter names (`token_embedder`, `encoder`), so a
student / Hugging Face T5 encoder initialises it directly (`params_with_t5_encoder`).

Trained with KL(softmax(labels / tau1) || softmax(scores / tau2)) over each question's real
candidates, labels being each candidate's BM25 score against the teacher's rationale (KARD
Eq. 5). The temperatures are fixed positive constants (the KARD release anneals them below
zero), and the whole encoder is trained (the release silently freezes its document encoder).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta

from kard_jax.models import losses, t5
from kard_jax.models.base import LOSS_DENOMINATOR, BaseModel

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]

# Score of a padded candidate slot: softmax gives it exactly 0 weight.
MASKED_SCORE = -1e9
_T5_ENCODER_PARAMS = ("token_embedder", "encoder")


class LateInteractionReranker(nn.Module):
    """T5 encoder -> linear projection to `proj_dim` -> L2 normalisation; ColBERT max-sim scores.

    Inputs are int token arrays padded with `config.pad_token_id`: queries [b, Lq], candidates
    [b, n, Lc]. `__call__` returns [b, n] scores; a candidate slot with no real token scores 0.
    """

    config: t5.T5Config
    proj_dim: int = 128

    def setup(self):
        c = self.config
        self.token_embedder = t5.Embed(c.vocab_size, c.d_model, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
        self.encoder = t5.Encoder(c, self.token_embedder)
        self.projection = t5.DenseGeneral(
            features=(self.proj_dim,), kernel_axes=("embed", "kv"), stddev=c.d_model**-0.5,
            dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
        )

    def encode(self, tokens: Array, enable_dropout: bool = False) -> Array:
        """[..., L] tokens -> [..., L, proj_dim] unit-norm float32 token vectors (zero on padding)."""
        lead, length = tokens.shape[:-1], tokens.shape[-1]
        flat = tokens.reshape((-1, length))
        hidden = self.encoder(flat, enable_dropout)
        vectors = self.projection(hidden).astype(jnp.float32)
        vectors = vectors * jax.lax.rsqrt(jnp.sum(jnp.square(vectors), axis=-1, keepdims=True) + 1e-12)
        vectors = jnp.where((flat != self.config.pad_token_id)[..., None], vectors, 0.0)
        return vectors.reshape(lead + (length, self.proj_dim))

    def __call__(self, query_tokens: Array, candidate_tokens: Array, enable_dropout: bool = False) -> Array:
        pad = self.config.pad_token_id
        q = self.encode(query_tokens, enable_dropout)  # [b, Lq, p]
        d = self.encode(candidate_tokens, enable_dropout)  # [b, n, Lc, p]
        return late_interaction(q, query_tokens != pad, d, candidate_tokens != pad)


def late_interaction(query: Array, query_mask: Array, docs: Array, doc_mask: Array) -> Array:
    """sum_i max_j <q_i, d_j> over real query tokens i and real doc tokens j.

    query [b, Lq, p], query_mask [b, Lq], docs [b, n, Lc, p], doc_mask [b, n, Lc] -> [b, n].
    A document without real tokens scores 0.
    """
    sim = jnp.einsum("bqp,bncp->bnqc", query, docs, preferred_element_type=jnp.float32)
    sim = jnp.where(doc_mask[:, :, None, :], sim, -jnp.inf)
    best = jnp.max(sim, axis=-1)  # [b, n, Lq]
    best = jnp.where(jnp.any(doc_mask, axis=-1)[:, :, None] & query_mask[:, None, :], best, 0.0)
    return jnp.sum(best, axis=-1)


class RankingStats:
    """Per-example KL loss and ranking metrics of scores against labels over real candidates."""

    def __init__(self, scores: Array, labels: Array, mask: Array, tau1: float, tau2: float):
        mask = mask.astype(bool)
        scores = scores.astype(jnp.float32)
        labels = labels.astype(jnp.float32)
        target_logp = jax.nn.log_softmax(jnp.where(mask, labels / tau1, MASKED_SCORE), axis=-1)
        model_logp = jax.nn.log_softmax(jnp.where(mask, scores / tau2, MASKED_SCORE), axis=-1)
        target_p = jnp.where(mask, jnp.exp(target_logp), 0.0)
        self.valid = jnp.any(mask, axis=-1)  # examples with at least one real candidate
        self.kl = jnp.sum(jnp.where(mask, target_p * (target_logp - model_logp), 0.0), axis=-1)

        masked_scores = jnp.where(mask, scores, -jnp.inf)
        masked_labels = jnp.where(mask, labels, -jnp.inf)
        top = jnp.argmax(masked_scores, axis=-1)
        best_label = jnp.max(masked_labels, axis=-1)
        # The model's top candidate has the best label (ties in the labels all count).
        self.top1 = (jnp.take_along_axis(masked_labels, top[:, None], axis=-1)[:, 0] >= best_label).astype(jnp.float32)
        # Reciprocal rank, in score order, of the first label-best candidate (ties in scores: index order).
        ranks = _ranks(masked_scores, mask)
        best = jnp.argmax(masked_labels, axis=-1)
        self.mrr = 1.0 / jnp.take_along_axis(ranks, best[:, None], axis=-1)[:, 0]
        # NDCG over all real candidates with the (non-negative) labels as gains.
        gains = jnp.where(mask, jnp.maximum(labels, 0.0), 0.0)
        dcg = jnp.sum(gains / jnp.log2(ranks + 1.0), axis=-1)
        ideal = jnp.sum(gains / jnp.log2(_ranks(jnp.where(mask, labels, -jnp.inf), mask) + 1.0), axis=-1)
        self.ndcg = losses.safe_divide(dcg, ideal)


def _ranks(values: Array, mask: Array) -> Array:
    """1-based rank of each real entry in descending `values` order (ties: lower index first)."""
    n = values.shape[-1]
    higher = values[..., None, :] > values[..., :, None]  # [.., i, j]: j ranks above i
    tied_before = (values[..., None, :] == values[..., :, None]) & (jnp.arange(n)[None, :] < jnp.arange(n)[:, None])
    above = (higher | tied_before) & mask[..., None, :]
    return 1.0 + jnp.sum(above, axis=-1).astype(jnp.float32)


class RerankerModel(BaseModel):
    """The reranker under the BaseModel contract (trained by the same `trainer.train` as the student).

    Batch keys (`RerankerFeatureConverter`): `query_tokens` [b, Lq], `candidate_tokens`
    [b, n, Lc], `labels` [b, n] (BM25 score of each candidate vs the rationale) and
    `candidate_mask` [b, n] (1 = real candidate). The loss is the mean over examples with at
    least one real candidate of KL(softmax(labels / tau1) || softmax(scores / tau2)).
    """

    INPUT_FEATURES = {"query_tokens": jnp.int32, "candidate_tokens": jnp.int32}

    def __init__(self, config: t5.T5Config, *, proj_dim: int = 128, tau1: float = 1.0, tau2: float = 1.0):
        for name, tau in (("tau1", tau1), ("tau2", tau2)):
            if not tau > 0:
                raise ValueError(f"RerankerModel.{name} must be a positive temperature, got {tau}")
        if proj_dim < 1:
            raise ValueError(f"RerankerModel.proj_dim must be positive, got {proj_dim}")
        super().__init__(LateInteractionReranker(config, proj_dim))
        self.tau1 = float(tau1)
        self.tau2 = float(tau2)

    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]) -> PyTree:
        query = jnp.ones(input_shapes["query_tokens"], jnp.int32)
        cands = jnp.ones(input_shapes["candidate_tokens"], jnp.int32)
        return self.module.init(rng, query, cands, enable_dropout=False)

    def batch_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Query plus candidate token positions (padding included)."""
        return int(np.size(batch["query_tokens"]) + np.size(batch["candidate_tokens"]))

    def scores(self, params: PyTree, batch: Batch, dropout_rng: Array | None = None) -> Array:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": params}, batch["query_tokens"], batch["candidate_tokens"],
            enable_dropout=dropout_rng is not None, rngs=rngs,
        )

    def _stats(self, scores: Array, batch: Batch) -> RankingStats:
        return RankingStats(scores, batch["labels"], batch["candidate_mask"], self.tau1, self.tau2)

    def loss_fn(self, params: PyTree, batch: Batch, dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
        stats = self._stats(self.scores(params, batch, dropout_rng), batch)
        weight = stats.valid.astype(jnp.float32)
        count = jnp.sum(weight)

        def mean(x):
            return losses.safe_divide(jnp.sum(x * weight), count)

        loss = mean(stats.kl)
        aux = {"loss": loss, "top1_agreement": mean(stats.top1), "mrr": mean(stats.mrr), "ndcg": mean(stats.ndcg),
               LOSS_DENOMINATOR: count}
        return loss, aux

    def predict_batch(self, params: PyTree, batch: Batch, **kwargs: Any) -> Array:
        """[b, n] late-interaction scores; padded candidate slots get `MASKED_SCORE`."""
        if kwargs:
            raise TypeError(f"RerankerModel.predict_batch takes no options, got {sorted(kwargs)}")
        scores = self.scores(params, batch)
        if "candidate_mask" in batch:
            scores = jnp.where(batch["candidate_mask"].astype(bool), scores, MASKED_SCORE)
        return scores

    def score_batch(self, params: PyTree, batch: Batch) -> Array:
        """[b] log-likelihood analogue: minus each example's KL from the label distribution."""
        return -self._stats(self.scores(params, batch), batch).kl


def _module_of(model: LateInteractionReranker | RerankerModel) -> LateInteractionReranker:
    return model.module if isinstance(model, RerankerModel) else model


@functools.partial(jax.jit, static_argnums=0)
def _score(module: LateInteractionReranker, params: PyTree, query_tokens: Array, candidate_tokens: Array) -> Array:
    return module.apply({"params": params}, query_tokens, candidate_tokens)


def score_candidates(
    model: LateInteractionReranker | RerankerModel, params: PyTree, query_tokens: Array, candidate_tokens: Array
) -> Array:
    """Jitted inference scores: query_tokens [b, Lq], candidate_tokens [b, n, Lc] -> [b, n] float32."""
    return _score(_module_of(model), meta.unbox(params), jnp.asarray(query_tokens, jnp.int32),
                  jnp.asarray(candidate_tokens, jnp.int32))


def params_with_t5_encoder(params: PyTree, t5_params: Mapping[str, Any]) -> PyTree:
    """Reranker params whose token embedding and encoder are taken from T5 (student / HF) params.

    The projection keeps its value from `params`. Shapes must agree (same vocab, d_model, layers).
    """
    params = dict(meta.unbox(params))
    t5_params = meta.unbox(t5_params)
    for name in _T5_ENCODER_PARAMS:
        want = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params[name])[0]}
        got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(t5_params[name])[0]}
        if want != got:
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise ValueError(f"T5 params under {name!r} do not match the reranker's: {diff[:3]} "
                             f"(reranker {[want.get(k) for k in diff[:3]]}, T5 {[got.get(k) for k in diff[:3]]})")
        params[name] = t5_params[name]
    return params


def hf_encoder_initializer(hf_dir: str, *, model: RerankerModel, seed: int = 0) -> Callable[[], PyTree]:
    """A `trainer.train(initial_checkpoint=...)` callable: the encoder of a Hugging Face T5
    directory (e.g. flan-t5-base) plus a freshly initialised projection."""

    def initial_params() -> PyTree:
        from kard_jax import hf_io

        _, t5_params = hf_io.load_hf_params(hf_dir)
        fresh = model.get_initial_variables(jax.random.PRNGKey(seed), {"query_tokens": (1, 1),
                                                                      "candidate_tokens": (1, 1, 1)})["params"]
        return params_with_t5_encoder(fresh, t5_params)

    initial_params.__name__ = f"hf_encoder_initializer({hf_dir})"
    return initial_params
