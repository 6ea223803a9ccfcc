"""`infer`: the evaluation run mode (gin_configs/runs/infer.gin).

Examples file -> passages per question (none | BM25 by the question | BM25 candidates reranked
by a trained reranker) -> the student decodes (greedy, or samples + majority vote) ->
predictions.jsonl + metrics.json + config.gin in OUT_DIR.

The student comes from a training MODEL_DIR (newest orbax checkpoint, or one step directory) or
from a Hugging Face T5 directory (e.g. an export); its architecture is the run's MODEL_CONFIG.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
from flax.core import meta

from kard_jax import hf_io
from kard_jax.data import prompts
from kard_jax.data.readers import read_examples
from kard_jax.errors import InputError
from kard_jax.inference import pipeline
from kard_jax.models import t5
from kard_jax.tokenizer import Tokenizer

PASSAGE_SOURCES = ("none", "bm25", "reranked")


def load_student_params(checkpoint: str | os.PathLike, model_config: t5.T5Config) -> Any:
    """Params from a Hugging Face T5 directory (has config.json) or a training checkpoint."""
    path = pathlib.Path(checkpoint)
    if not path.exists():
        raise InputError("checkpoint not found", path=path, field="checkpoint")
    if (path / hf_io.CONFIG_FILE).is_file():
        return hf_io.initial_params(path, model_config)
    from kard_jax.training import checkpoints

    return checkpoints.restore_params(path, hf_io.abstract_params(model_config))


def load_reranker_params(checkpoint: str | os.PathLike, model: Any, query_length: int, candidate_length: int) -> Any:
    """A trained reranker's params (training MODEL_DIR or step directory), restored on the host."""
    from kard_jax.training import checkpoints

    shapes = {"query_tokens": (1, query_length), "candidate_tokens": (1, 1, candidate_length)}
    abstract = meta.unbox(jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), abstract["params"])
    return checkpoints.restore_params(checkpoint, abstract)


def infer(
    *,
    examples_path: str,
    out_dir: str,
    model_config: t5.T5Config,
    checkpoint: str,
    vocab_path: str,
    kb_dir: str | None = None,
    passage_source: str = "bm25",
    n_docs: int = 1,
    input_length: int = 512,
    decode: pipeline.DecodeConfig = pipeline.DecodeConfig(),
    batch_size: int = 8,
    examples_format: str = "kard",
    dataset: str | None = None,
    prompt_template: str | None = None,
    limit: int | None = None,
    reranker: Any = None,
    reranker_checkpoint: str | None = None,
    n_candidates: int = 100,
    query_length: int = 128,
    candidate_length: int = 256,
) -> dict:
    """Evaluates a student on one examples file; returns the metrics (also in OUT_DIR/metrics.json).

    `passage_source`: "none" (FT/RD students), "bm25" (top `n_docs` by the question, KARD-BM25) or
    "reranked" (BM25 top `n_candidates` rescored by `reranker`, a `RerankerModel`, restored from
    `reranker_checkpoint`; KARD-reranker). `prompt_template` overrides the dataset's template.
    """
    if passage_source not in PASSAGE_SOURCES:
        raise InputError(f"passage_source must be one of {PASSAGE_SOURCES}, got {passage_source!r}",
                         field="passage_source")
    if passage_source != "none" and kb_dir is None:
        raise InputError(f"passage_source={passage_source!r} needs kb_dir", field="kb_dir")
    examples = read_examples(examples_path, format=examples_format, dataset=dataset)[:limit]
    if not examples:
        raise InputError("no examples to evaluate", path=examples_path)
    template = prompts.template_for(prompt_template or examples[0].dataset)
    tokenizer = Tokenizer(vocab_path)
    params = jax.device_get(load_student_params(checkpoint, model_config))

    if passage_source == "none":
        passages_for = pipeline.no_passages
    elif passage_source == "bm25":
        passages_for = pipeline.bm25_question_passages(kb_dir, n_docs)
    else:
        if reranker is None or reranker_checkpoint is None:
            raise InputError("passage_source='reranked' needs reranker and reranker_checkpoint",
                             field="reranker_checkpoint")
        from kard_jax.inference import rerank

        reranker_params = load_reranker_params(reranker_checkpoint, reranker, query_length, candidate_length)
        passages_for = rerank.reranked_passages(
            kb_dir, model=reranker, params=reranker_params, tokenizer=tokenizer, n_candidates=n_candidates,
            n_docs=n_docs, query_length=query_length, candidate_length=candidate_length, batch_size=batch_size,
        )

    metrics = pipeline.evaluate(
        examples, out_dir=out_dir, model=t5.T5(model_config), params=params, tokenizer=tokenizer,
        passages_for=passages_for, input_length=input_length, decode=decode, batch_size=batch_size,
        template=template,
    )
    if jax.process_index() == 0:
        from kard_jax import gin_utils

        gin_utils.write_operative_config(out_dir)
    return metrics
