"""Feature converters: task features -> the arrays the models consume.

Student (encoder-decoder): `seqio.EncDecFeatureConverter(pack=False)`, giving
`encoder_input_tokens`, `decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights`.

Reranker: task features `query` [<=Lq], `candidates` [<=n, <=Lc] (ragged), `labels` [<=n] with
task_feature_lengths `{"query": Lq, "candidates": Lc, "labels": n}` become `query_tokens` [Lq],
`candidate_tokens` [n, Lc], `labels` [n], `candidate_mask` [n] (1 for a real candidate, 0 for a
padded slot) and `lexical_scores` [n] (each candidate's BM25 score against the question query),
all zero-padded; a task with stored passage vectors also gives `candidate_vectors` [n, dim].
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

FeatureSpec = seqio.FeatureConverter.FeatureSpec


def student_feature_converter(pack: bool = False) -> seqio.EncDecFeatureConverter:
    """The encoder-decoder converter for student tasks (no packing by default)."""
    return seqio.EncDecFeatureConverter(pack=pack)


class RerankerFeatureConverter(seqio.FeatureConverter):
    """Pads a question and its candidate passages to fixed [Lq], [n, Lc] shapes (no packing)."""

    TASK_FEATURES = {
        "query": FeatureSpec(dtype=tf.int32),
        "candidates": FeatureSpec(dtype=tf.int32, rank=2, sequence_dim=1),
        "labels": FeatureSpec(dtype=tf.float32),
    }  # and `lexical_scores` [<=n], padded like `labels` (its length is the labels')
    MODEL_FEATURES = {
        "query_tokens": FeatureSpec(dtype=tf.int32),
        "candidate_tokens": FeatureSpec(dtype=tf.int32, rank=2, sequence_dim=1),
        "labels": FeatureSpec(dtype=tf.float32),
        "candidate_mask": FeatureSpec(dtype=tf.int32),
        "lexical_scores": FeatureSpec(dtype=tf.float32),
    }
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, stored_passages: bool = False, **kwargs):
        """`stored_passages`: the task's records carry `candidate_vectors` (the knowledge base's
        embeddings of the candidates, `register_kard_tasks(reranker_stored_passages=True)`), passed
        on padded to [n, dim] for `RerankerModel(stored_passages=True)`."""
        if kwargs.pop("pack", False):
            raise ValueError("RerankerFeatureConverter does not pack")
        self.stored_passages = bool(stored_passages)
        if self.stored_passages:
            self.MODEL_FEATURES = {**self.MODEL_FEATURES,
                                   "candidate_vectors": FeatureSpec(dtype=tf.float32, rank=2, sequence_dim=0)}
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        lq = task_feature_lengths["query"]
        lc = task_feature_lengths["candidates"]
        n = task_feature_lengths["labels"]

        def convert(ex):
            query = ex["query"][:lq]
            query = tf.pad(query, [[0, lq - tf.shape(query)[0]]])
            cands = ex["candidates"]
            if not isinstance(cands, tf.RaggedTensor):
                cands = tf.RaggedTensor.from_tensor(cands)
            cands = cands[:n, :lc].to_tensor(default_value=0, shape=[n, lc])
            labels = ex["labels"][:n]
            count = tf.shape(labels)[0]
            mask = tf.cast(tf.range(n) < count, tf.int32)
            labels = tf.pad(labels, [[0, n - count]])
            lexical = tf.pad(ex["lexical_scores"][:n], [[0, n - count]])
            query.set_shape([lq])
            labels.set_shape([n])
            lexical.set_shape([n])
            out = {"query_tokens": query, "candidate_tokens": cands, "labels": labels, "candidate_mask": mask,
                   "lexical_scores": lexical}
            if self.stored_passages:  # stored passage embeddings [<=n, dim] -> [n, dim]
                if "candidate_vectors" not in ex:
                    raise ValueError("RerankerFeatureConverter(stored_passages=True) needs a task whose records carry "
                                     "candidate_vectors (register_kard_tasks(reranker_stored_passages=True))")
                vectors = ex["candidate_vectors"][:n]
                vectors = tf.pad(vectors, [[0, n - tf.shape(vectors)[0]], [0, 0]])
                vectors.set_shape([n, ex["candidate_vectors"].shape[-1]])
                out["candidate_vectors"] = vectors
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        return {
            "query_tokens": task_feature_lengths["query"],
            "candidate_tokens": task_feature_lengths["candidates"],
            "labels": task_feature_lengths["labels"],
            "candidate_mask": task_feature_lengths["labels"],
            "lexical_scores": task_feature_lengths["labels"],
            **({"candidate_vectors": task_feature_lengths["labels"]} if self.stored_passages else {}),
        }
