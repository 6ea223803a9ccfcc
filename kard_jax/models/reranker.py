"""KARD's neural reranker: a late-interaction (ColBERT-style) or dual-encoder scorer over a T5
encoder or a BERT-family encoder (MiniLM, BERT, LinkBERT / BioLinkBERT, RoBERTa-style).

Backbone: the type of the config decides. A `t5.T5Config` reuses `kard_jax.models.t5` with the
student's parameter names (`token_embedder`, `encoder`), so a student / Hugging Face T5 encoder
initialises it directly (`params_with_t5_encoder`); a `bert.BertConfig` puts a
`bert.BertEncoder` under `encoder`, initialised from a Hugging Face BERT-family directory
(`params_with_bert_encoder`, `hf_encoder_initializer`). Either way the token vectors are the
encoder's last hidden states, optionally projected (`proj_dim`; 0 keeps the encoder width, e.g.
to use a pretrained sentence encoder's own embedding space).

Head (`head`):
* "late_interaction" (the paper, ColBERT): score(q, p) = sum over real query tokens of the max
  over real passage tokens of the dot product of L2-normalised token vectors;
* "dual_encoder": score(q, p) = <e(q), e(p)> with e = mean over real tokens, L2-normalised
  (sentence-transformers pooling), so passages can be embedded once and served by ScaNN.

Loss (KARD Eq. 3): KL(softmax(BM25(r, p) / tau1) || softmax(f(q, p) / tau2)) over each
question's real candidates, BM25(r, p) being each candidate's BM25 score against the teacher's
rationale r. Raw BM25 scores spread over tens of points, so with tau1 = 1 the target is nearly
one-hot (median top weight 0.997 on StrategyQA) and the loss only teaches the arg-max.
`label_normalization="standardize"` (the default) z-scores each question's labels over its real
candidates before dividing by tau1: since softmax ignores the mean shift, this is exactly Eq. 3
with a per-question temperature tau1 * std_q(BM25), i.e. tau1 is then measured in standard
deviations of that question's scores and means the same for every question and corpus;
"none" is Eq. 3 on the raw scores.

Lexical feature (`lexical_weight`, off by default): a hybrid reranker adds to its neural score
`w * z(BM25(q, p))` and scales its encoder score by a trained `g`: score = g * f(q, p) + w * z(BM25(q, p)),
z(BM25(q, p)) being the candidate's BM25 score against the question query
z-scored over the question's retrieved candidate list (`lexical_features`; batch key
`lexical_scores`, built in the data pipeline at training and by `inference.rerank` at test time
over the same kind of list, so a candidate's feature does not depend on which candidates a
training record kept) and `w` a trained
scalar (parameter `lexical_weight`) initialised to `tau2 * lexical_weight`: the setting is in
logits per standard deviation, so 1.0 starts a reranker whose scores spread about one logit per
standard deviation as an even blend of BM25 and its encoder. Ranking BM25 candidates, the first-stage
score is evidence that a small encoder fine-tuned on a few thousand questions does not recover on
its own (StrategyQA figures: docs/RERANKER.md); the model learns how much of it to keep.
`g` (parameter `neural_weight`) starts at `neural_weight` (1.0 by default); 0.0 starts the
reranker as exactly the first-stage BM25 ranking and lets training add the encoder's score only
as far as it helps (a randomly initialised encoder otherwise starts as noise on top of BM25; its
gradients are zero until `g` moves off 0, which it does in the first steps).

Stored passages (`stored_passages=True`, dual encoder only, `proj_dim` 0): the document tower is
frozen and is the knowledge base's own dense embeddings (`build_kb` with the backbone as its
EMBEDDER, e.g. MiniLM), passed as `candidate_vectors` [b, n, dim] instead of candidate tokens; only
the query tower (and the hybrid weights) are trained. A candidate then costs one row gather instead
of an encoder pass, in training and at inference, and the reranker scores in the space ScaNN serves. The temperatures are fixed positive constants (the KARD
release anneals them below zero), and the whole encoder is trained (the release silently freezes
its document encoder) unless it is wrapped with LoRA (`kard_jax.models.lora`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta

from kard_jax.models import bert, losses, t5
from kard_jax.models.base import LOSS_DENOMINATOR, BaseModel

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]

# Score of a padded candidate slot: softmax gives it exactly 0 weight.
MASKED_SCORE = -1e9
_T5_ENCODER_PARAMS = ("token_embedder", "encoder")
HEADS = ("late_interaction", "dual_encoder")
LABEL_NORMALIZATIONS = ("none", "standardize")
BackboneConfig = Any  # t5.T5Config | bert.BertConfig


class Reranker(nn.Module):
    """Encoder -> [projection to `proj_dim`] -> late-interaction or dual-encoder scores.

    Inputs are int token arrays padded with `config.pad_token_id`: queries [b, Lq], candidates
    [b, n, Lc]. `__call__` returns [b, n] scores; a candidate slot with no real token scores 0.
    """

    config: BackboneConfig
    proj_dim: int = 128  # 0: no projection (vectors are the encoder's hidden states)
    head: str = "late_interaction"
    lexical_weight: float | None = None  # None: no lexical feature; else its initial weight (score units)
    neural_weight: float = 1.0  # a hybrid's initial weight of the encoder score (its parameter `neural_weight`)
    stored_passages: bool = False  # candidates are stored unit-norm passage vectors (frozen document tower)

    def setup(self):
        c = self.config
        if isinstance(c, t5.T5Config):
            self.token_embedder = t5.Embed(c.vocab_size, c.d_model, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
            self.encoder = t5.Encoder(c, self.token_embedder)
        elif isinstance(c, bert.BertConfig):
            self.encoder = bert.BertEncoder(c)
        else:
            raise TypeError(f"reranker backbone config must be t5.T5Config or bert.BertConfig, got {type(c).__name__}")
        if self.lexical_weight is not None:
            self.lexical_weight_param = self.param("lexical_weight", nn.with_logical_partitioning(
                nn.initializers.constant(self.lexical_weight), ()), (), jnp.float32)
            self.neural_weight_param = self.param("neural_weight", nn.with_logical_partitioning(
                nn.initializers.constant(self.neural_weight), ()), (), jnp.float32)
        if self.proj_dim:
            self.projection = t5.DenseGeneral(
                features=(self.proj_dim,), kernel_axes=("embed", "kv"), stddev=c.d_model**-0.5,
                dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
            )

    @property
    def pad_id(self) -> int:
        return self.config.pad_token_id

    @property
    def dim(self) -> int:
        return self.proj_dim or self.config.d_model

    def hidden(self, tokens: Array, enable_dropout: bool = False) -> Array:
        """[..., L] tokens -> [..., L, dim] float32 (projected) token vectors, not normalised."""
        lead, length = tokens.shape[:-1], tokens.shape[-1]
        flat = tokens.reshape((-1, length))
        hidden = self.encoder(flat, enable_dropout)
        if self.proj_dim:
            hidden = self.projection(hidden)
        return hidden.astype(jnp.float32).reshape(lead + (length, self.dim))

    def encode(self, tokens: Array, enable_dropout: bool = False) -> Array:
        """[..., L] tokens -> [..., L, dim] unit-norm float32 token vectors (zero on padding)."""
        vectors = self.hidden(tokens, enable_dropout)
        vectors = vectors * jax.lax.rsqrt(jnp.sum(jnp.square(vectors), axis=-1, keepdims=True) + 1e-12)
        return jnp.where((tokens != self.pad_id)[..., None], vectors, 0.0)

    def embed(self, tokens: Array, enable_dropout: bool = False) -> Array:
        """[..., L] tokens -> [..., dim] dual-encoder embeddings: mean over real tokens, L2-normalised
        (zero for a sequence without real tokens)."""
        return bert.mean_pool(self.hidden(tokens, enable_dropout), tokens, self.pad_id)

    def __call__(self, query_tokens: Array, candidate_tokens: Array | None, enable_dropout: bool = False,
                 lexical_scores: Array | None = None, candidate_vectors: Array | None = None) -> Array:
        scores = self.neural_scores(query_tokens, candidate_tokens, enable_dropout, candidate_vectors)
        if self.lexical_weight is None:
            return scores
        if lexical_scores is None:
            raise ValueError("this reranker has a lexical feature (lexical_weight is set): pass lexical_scores, "
                             "the candidates' lexical_features")
        return self.neural_weight_param * scores + self.lexical_weight_param * lexical_scores.astype(jnp.float32)

    def neural_scores(self, query_tokens: Array, candidate_tokens: Array | None, enable_dropout: bool = False,
                      candidate_vectors: Array | None = None) -> Array:
        """[b, n] scores of the encoder alone (late interaction or dual encoder; with
        `stored_passages`, against the given `candidate_vectors` [b, n, dim])."""
        if self.stored_passages:
            if candidate_vectors is None:
                raise ValueError("this reranker scores stored passage vectors (stored_passages=True): pass "
                                 "candidate_vectors, the knowledge base's embeddings of the candidates")
            q = self.embed(query_tokens, enable_dropout)  # [b, p]
            return jnp.einsum("bp,bnp->bn", q, candidate_vectors.astype(jnp.float32),
                              preferred_element_type=jnp.float32)
        if self.head == "dual_encoder":
            q = self.embed(query_tokens, enable_dropout)  # [b, p]
            d = self.embed(candidate_tokens, enable_dropout)  # [b, n, p]
            return jnp.einsum("bp,bnp->bn", q, d, preferred_element_type=jnp.float32)
        if self.head != "late_interaction":
            raise ValueError(f"reranker head must be one of {HEADS}, got {self.head!r}")
        q = self.encode(query_tokens, enable_dropout)  # [b, Lq, p]
        d = self.encode(candidate_tokens, enable_dropout)  # [b, n, Lc, p]
        return late_interaction(q, query_tokens != self.pad_id, d, candidate_tokens != self.pad_id)


# The class's earlier name (it now also has the dual-encoder head).
LateInteractionReranker = Reranker


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

    def __init__(self, scores: Array, labels: Array, mask: Array, tau1: float, tau2: float,
                 label_normalization: str = "none"):
        mask = mask.astype(bool)
        scores = scores.astype(jnp.float32)
        labels = labels.astype(jnp.float32)
        self.target_logits = target_logits(labels, mask, tau1, label_normalization)
        target_logp = jax.nn.log_softmax(self.target_logits, axis=-1)
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


def lexical_features(bm25_scores: Sequence[float], reference_count: int | None = None) -> np.ndarray:
    """The hybrid reranker's lexical feature of a question's candidates: their BM25 scores against
    the question query, z-scored with the mean and (population) standard deviation of the first
    `reference_count` (None: all), the question's own retrieved list; all zeros if those are equal.
    """
    scores = np.asarray(bm25_scores, np.float64)
    reference = scores[:reference_count] if reference_count is not None else scores
    if not len(reference):
        return np.zeros(len(scores), np.float32)
    std = reference.std()
    if std <= 1e-6:
        return np.zeros(len(scores), np.float32)
    return ((scores - reference.mean()) / std).astype(np.float32)


def normalize_labels(labels: Array, mask: Array, method: str) -> Array:
    """Labels as the target distribution sees them (before /tau1); padded slots are left as is.

    "none": unchanged; "standardize": per row z-score over the real candidates (population std;
    a row whose real labels are all equal becomes all zeros, i.e. a uniform target).
    """
    if method == "none":
        return labels
    if method != "standardize":
        raise ValueError(f"label_normalization must be one of {LABEL_NORMALIZATIONS}, got {method!r}")
    mask = mask.astype(bool)
    labels = labels.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(mask, labels, 0.0), axis=-1, keepdims=True) / count
    var = jnp.sum(jnp.where(mask, jnp.square(labels - mean), 0.0), axis=-1, keepdims=True) / count
    std = jnp.sqrt(var)
    z = jnp.where(std > 1e-6, (labels - mean) / jnp.where(std > 1e-6, std, 1.0), 0.0)
    return jnp.where(mask, z, labels)


def target_logits(labels: Array, mask: Array, tau1: float, label_normalization: str = "none") -> Array:
    """Logits of the target distribution: normalised labels / tau1, `MASKED_SCORE` on padded slots."""
    mask = mask.astype(bool)
    return jnp.where(mask, normalize_labels(labels, mask, label_normalization) / tau1, MASKED_SCORE)


def target_distribution(labels: Array, mask: Array, tau1: float, label_normalization: str = "none") -> Array:
    """softmax of `target_logits` (exactly 0 on padded slots)."""
    return jnp.where(mask.astype(bool), jax.nn.softmax(target_logits(labels, mask, tau1, label_normalization), -1), 0.0)


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
    [b, n, Lc], `labels` [b, n] (BM25 score of each candidate vs the rationale),
    `candidate_mask` [b, n] (1 = real candidate) and `lexical_scores` [b, n] (`lexical_features`
    of the candidates; read only with `lexical_weight`). The loss is the mean over examples with at
    least one real candidate of KL(softmax(norm(labels) / tau1) || softmax(scores / tau2)), norm
    being `label_normalization` ("standardize": per-question z-score; "none": raw labels).

    `config` is the backbone's (`t5.T5Config` or `bert.BertConfig`); `head` is
    "late_interaction" or "dual_encoder"; `proj_dim` 0 uses the encoder's hidden states as is;
    `lexical_weight` None is the paper's reranker, a number adds the trained lexical feature
    (see the module docstring) starting at that weight. `stored_passages`: the batch holds
    `candidate_vectors` [b, n, dim] (the knowledge base's passage embeddings) in place of
    `candidate_tokens`; needs the dual-encoder head and `proj_dim` 0.
    """

    INPUT_FEATURES = {"query_tokens": jnp.int32, "candidate_tokens": jnp.int32}

    def __init__(self, config: BackboneConfig, *, proj_dim: int = 128, tau1: float = 1.0, tau2: float = 1.0,
                 head: str = "late_interaction", label_normalization: str = "standardize",
                 lexical_weight: float | None = None, neural_weight: float = 1.0, stored_passages: bool = False):
        for name, tau in (("tau1", tau1), ("tau2", tau2)):
            if not tau > 0:
                raise ValueError(f"RerankerModel.{name} must be a positive temperature, got {tau}")
        if proj_dim < 0:
            raise ValueError(f"RerankerModel.proj_dim must be >= 0 (0: no projection), got {proj_dim}")
        if head not in HEADS:
            raise ValueError(f"RerankerModel.head must be one of {HEADS}, got {head!r}")
        if label_normalization not in LABEL_NORMALIZATIONS:
            raise ValueError(f"RerankerModel.label_normalization must be one of {LABEL_NORMALIZATIONS}, "
                             f"got {label_normalization!r}")
        if not isinstance(config, (t5.T5Config, bert.BertConfig)):
            raise TypeError(f"RerankerModel.config must be a t5.T5Config or bert.BertConfig, got {type(config).__name__}")
        if lexical_weight is not None and not np.isfinite(lexical_weight):
            raise ValueError(f"RerankerModel.lexical_weight must be a finite number or None, got {lexical_weight}")
        if not np.isfinite(neural_weight):
            raise ValueError(f"RerankerModel.neural_weight must be a finite number, got {neural_weight}")
        if stored_passages and (head != "dual_encoder" or proj_dim != 0):
            raise ValueError("RerankerModel.stored_passages scores the knowledge base's own passage embeddings: it "
                             f"needs head='dual_encoder' and proj_dim=0 (got head={head!r}, proj_dim={proj_dim})")
        lexical_weight = None if lexical_weight is None else float(lexical_weight)
        # The parameter is in score units (scores / tau2 are the logits), so a restored reranker
        # scores the same whatever tau2 the inference gin gives; only its initial value uses tau2.
        super().__init__(Reranker(config, proj_dim, head, None if lexical_weight is None else lexical_weight * tau2,
                                  float(neural_weight), bool(stored_passages)))
        self._lexical_weight = lexical_weight
        if stored_passages:
            self.INPUT_FEATURES = {"query_tokens": jnp.int32, "candidate_vectors": jnp.float32}
        if lexical_weight is not None:
            self.INPUT_FEATURES = {**self.INPUT_FEATURES, "lexical_scores": jnp.float32}
        self.tau1 = float(tau1)
        self.tau2 = float(tau2)
        self.label_normalization = label_normalization

    @property
    def config(self) -> BackboneConfig:
        return self.module.config

    @property
    def lexical_weight(self) -> float | None:
        """The lexical feature's initial weight in logits per standard deviation (None: no feature)."""
        return self._lexical_weight

    @property
    def stored_passages(self) -> bool:
        return self.module.stored_passages

    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]) -> PyTree:
        """Parameters do not depend on lengths; with `stored_passages` any candidate shape given
        (tokens or vectors) is replaced by one [1, 1, d_model] vector."""
        query = jnp.ones(input_shapes["query_tokens"], jnp.int32)
        if self.stored_passages:
            cands, vectors = None, jnp.zeros((query.shape[0], 1, self.config.d_model), jnp.float32)
            count = 1
        else:
            cands, vectors = jnp.ones(input_shapes["candidate_tokens"], jnp.int32), None
            count = cands.shape[1]
        lexical = jnp.zeros((query.shape[0], count), jnp.float32) if self.lexical_weight is not None else None
        return self.module.init(rng, query, cands, enable_dropout=False, lexical_scores=lexical,
                                candidate_vectors=vectors)

    def batch_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Query plus candidate token positions (padding included; stored passages count none)."""
        if self.stored_passages:
            return int(np.size(batch["query_tokens"]))
        return int(np.size(batch["query_tokens"]) + np.size(batch["candidate_tokens"]))

    def scores(self, params: PyTree, batch: Batch, dropout_rng: Array | None = None) -> Array:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": params}, batch["query_tokens"], batch.get("candidate_tokens"),
            enable_dropout=dropout_rng is not None, rngs=rngs, lexical_scores=batch.get("lexical_scores"),
            candidate_vectors=batch.get("candidate_vectors") if self.stored_passages else None,
        )

    def _stats(self, scores: Array, batch: Batch) -> RankingStats:
        return RankingStats(scores, batch["labels"], batch["candidate_mask"], self.tau1, self.tau2,
                            self.label_normalization)

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
def _score(module: LateInteractionReranker, params: PyTree, query_tokens: Array, candidate_tokens: Array | None,
           lexical_scores: Array | None, candidate_vectors: Array | None) -> Array:
    return module.apply({"params": params}, query_tokens, candidate_tokens, lexical_scores=lexical_scores,
                        candidate_vectors=candidate_vectors)


def uses_lexical_scores(model: LateInteractionReranker | RerankerModel) -> bool:
    """Whether `score_candidates` needs the candidates' BM25 scores against the question query."""
    model = getattr(model, "model", model)  # a LoRA wrapper scores with its base model
    return _module_of(model).lexical_weight is not None


def uses_stored_passages(model: LateInteractionReranker | RerankerModel) -> bool:
    """Whether `score_candidates` takes the candidates' stored vectors instead of their tokens."""
    model = getattr(model, "model", model)
    return _module_of(model).stored_passages


def score_candidates(
    model: LateInteractionReranker | RerankerModel, params: PyTree, query_tokens: Array,
    candidate_tokens: Array | None, lexical_scores: Array | None = None, candidate_vectors: Array | None = None,
) -> Array:
    """Jitted inference scores: query_tokens [b, Lq], candidate_tokens [b, n, Lc] (or, for a
    `stored_passages` model, candidate_vectors [b, n, dim]) -> [b, n] float32; `lexical_scores`
    [b, n] (`lexical_features`) for a model with a lexical feature.

    A LoRA-wrapped model (`lora.LoraModel`) is scored with its merged weights.
    """
    if hasattr(model, "merge_params"):
        params, model = model.merge_params(meta.unbox(params)), model.model
    lexical = None if lexical_scores is None else jnp.asarray(lexical_scores, jnp.float32)
    tokens = None if candidate_tokens is None else jnp.asarray(candidate_tokens, jnp.int32)
    vectors = None if candidate_vectors is None else jnp.asarray(candidate_vectors, jnp.float32)
    return _score(_module_of(model), meta.unbox(params), jnp.asarray(query_tokens, jnp.int32), tokens, lexical,
                  vectors)


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


def params_with_bert_encoder(params: PyTree, bert_params: Mapping[str, Any]) -> PyTree:
    """Reranker params (BERT backbone) whose encoder is taken from `bert.BertEncoder` params
    (e.g. `hf_bert_io.load_hf_params(..., with_pooler=False)`); the projection keeps its value."""
    params = dict(meta.unbox(params))
    bert_params = meta.unbox(bert_params)
    want = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params["encoder"])[0]}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(bert_params)[0]}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ValueError(f"BERT params do not match the reranker's encoder: {diff[:3]} "
                         f"(reranker {[want.get(k) for k in diff[:3]]}, given {[got.get(k) for k in diff[:3]]})")
    params["encoder"] = bert_params
    return params


def hf_encoder_initializer(hf_dir: str, *, model: RerankerModel, seed: int = 0) -> Callable[[], PyTree]:
    """A `trainer.train(initial_checkpoint=...)` callable: the encoder of a Hugging Face directory
    (T5 backbone: a T5 checkpoint such as flan-t5-base; BERT backbone: a BERT-family checkpoint
    such as all-MiniLM-L6-v2 or LinkBERT) plus a freshly initialised projection."""

    def initial_params() -> PyTree:
        fresh = model.get_initial_variables(jax.random.PRNGKey(seed), {"query_tokens": (1, 1),
                                                                      "candidate_tokens": (1, 1, 1)})["params"]
        if isinstance(model.config, bert.BertConfig):
            from kard_jax import hf_bert_io

            return params_with_bert_encoder(fresh, hf_bert_io.initial_params(hf_dir, model.config))
        from kard_jax import hf_io

        _, t5_params = hf_io.load_hf_params(hf_dir)
        return params_with_t5_encoder(fresh, t5_params)

    initial_params.__name__ = f"hf_encoder_initializer({hf_dir})"
    return initial_params
