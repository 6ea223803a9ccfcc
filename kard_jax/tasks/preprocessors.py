"""TensorFlow side of the task pipelines: record -> tf.data source, and the token preprocessors.

Python records (kard_jax.tasks.sources) are built eagerly when a split is requested, so bad input
raises `InputError` at `get_dataset` time instead of deep inside a tf.data iterator, and then
streamed through `tf.data.Dataset.from_generator` with a fixed signature.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

STUDENT_SIGNATURE = {
    "id": tf.TensorSpec([], tf.string),
    "question_id": tf.TensorSpec([], tf.string),
    "rationale_index": tf.TensorSpec([], tf.int32),
    "inputs": tf.TensorSpec([], tf.string),
    "targets": tf.TensorSpec([], tf.string),
    "answer": tf.TensorSpec([], tf.int32),
    "options": tf.TensorSpec([None], tf.string),
    "passage_ids": tf.TensorSpec([None], tf.string),
}

RERANKER_SIGNATURE = {
    "id": tf.TensorSpec([], tf.string),
    "question_id": tf.TensorSpec([], tf.string),
    "rationale_index": tf.TensorSpec([], tf.int32),
    "query": tf.TensorSpec([], tf.string),
    "candidates": tf.TensorSpec([None], tf.string),
    "candidate_ids": tf.TensorSpec([None], tf.string),
    "labels": tf.TensorSpec([None], tf.float32),
    "lexical_scores": tf.TensorSpec([None], tf.float32),
}


def reranker_signature(stored_passages: bool = False) -> dict[str, tf.TensorSpec]:
    """`RERANKER_SIGNATURE`, plus `candidate_positions` [n] (the candidates' positions in the
    knowledge base's store, for `gather_passage_vectors`) with `stored_passages`."""
    if not stored_passages:
        return dict(RERANKER_SIGNATURE)
    return {**RERANKER_SIGNATURE, "candidate_positions": tf.TensorSpec([None], tf.int32)}


def gather_passage_vectors(dataset: tf.data.Dataset, table: Callable[[], object]) -> tf.data.Dataset:
    """`candidate_positions` [n] -> `candidate_vectors` [n, dim]: rows of `table()`, the knowledge
    base's passage embeddings (loaded when the dataset is built; one in-graph gather per record)."""
    vectors = tf.constant(table(), tf.float32)

    def fn(ex):
        ex = dict(ex)
        ex["candidate_vectors"] = tf.gather(vectors, ex["candidate_positions"])
        return ex

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def records_dataset(records: Sequence[Mapping], signature: Mapping[str, tf.TensorSpec]) -> tf.data.Dataset:
    """A tf.data.Dataset streaming already-built Python records in order."""
    keys = list(signature)

    def generate():
        for record in records:
            yield {k: record[k] for k in keys}

    return tf.data.Dataset.from_generator(generate, output_signature=dict(signature))


def make_dataset_fn(build_records: Callable[[str], Sequence[Mapping]], signature: Mapping[str, tf.TensorSpec]):
    """A `seqio.FunctionDataSource` dataset_fn over `build_records(split)` (built on call)."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one in-memory "file"; the Task shuffles examples
        return records_dataset(build_records(split), signature)

    return dataset_fn


def tokenize_candidates(dataset: tf.data.Dataset, vocabulary: seqio.Vocabulary) -> tf.data.Dataset:
    """Reranker candidates: strings [n] -> ragged int32 tokens [n, None] (+ `candidates_pretokenized`)."""

    def fn(ex):
        ex = dict(ex)
        ex["candidates_pretokenized"] = ex["candidates"]
        ex["candidates"] = vocabulary.encode_tf(ex["candidates"])
        return ex

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def trim_candidates(
    dataset: tf.data.Dataset,
    eos_id: int,
    sequence_length: Mapping[str, int] | None = None,
) -> tf.data.Dataset:
    """Keep the first `sequence_length["labels"]` candidates (labels, ids, lexical scores), cut each candidate to
    `sequence_length["candidates"] - 1` tokens and append EOS (seqio's `append_eos_after_trim`
    for a [n, None] feature). Without `sequence_length` only EOS is appended."""
    max_cands = (sequence_length or {}).get("labels")
    max_tokens = (sequence_length or {}).get("candidates")

    def fn(ex):
        ex = dict(ex)
        cands, labels = ex["candidates"], ex["labels"]
        if max_cands is not None:
            cands, labels = cands[:max_cands], labels[:max_cands]
            for key in ("candidate_ids", "candidates_pretokenized", "lexical_scores", "candidate_positions",
                        "candidate_vectors"):
                if key in ex:
                    ex[key] = ex[key][:max_cands]
        if max_tokens is not None:
            cands = cands[:, : max_tokens - 1]
        eos = tf.fill([cands.nrows(), 1], tf.constant(eos_id, cands.dtype))
        eos = tf.RaggedTensor.from_tensor(eos, row_splits_dtype=cands.row_splits.dtype)
        ex["candidates"] = tf.concat([cands, eos], axis=1)
        ex["labels"] = labels
        return ex

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
