"""`infer`: the evaluation run mode (gin_configs/runs/infer.gin).

Examples file -> passages per question (`kard_jax.inference.passages`: none | bm25 | dense |
reranked | silver) -> the student decodes (greedy, or samples + majority vote, over one or more
seeds) -> predictions.jsonl + metrics.json + config.gin in OUT_DIR.

The student comes from a training MODEL_DIR (newest orbax checkpoint, or one step directory) or
from a Hugging Face T5 directory (e.g. an export); its architecture is the run's MODEL_CONFIG.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

import jax
from flax.core import meta

from kard_jax import hf_io
from kard_jax.data import prompts
from kard_jax.data.query import DEFAULT_QUERY_FORM, check_query_form
from kard_jax.data.readers import read_examples
from kard_jax.errors import InputError
from kard_jax.inference import pipeline
from kard_jax.models import t5
from kard_jax.tokenizer import Tokenizer



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
    query_form: str = DEFAULT_QUERY_FORM,
    input_length: int = 512,
    decode: pipeline.DecodeConfig = pipeline.DecodeConfig(),
    seeds: Sequence[int] | None = None,
    batch_size: int = 8,
    examples_format: Any = "kard",
    dataset: str | None = None,
    prompt_template: str | None = None,
    limit: int | None = None,
    reranker: Any = None,
    reranker_checkpoint: str | None = None,
    n_candidates: int = 100,
    candidate_source: str = "bm25",
    query_length: int = 128,
    candidate_length: int = 256,
    embedder: Any = None,
    rationales_path: str | None = None,
    method: str | None = None,
) -> dict:
    """Evaluates a student on one examples file; returns the metrics (also in OUT_DIR/metrics.json).

    `passage_source` (`kard_jax.inference.passages.PASSAGE_SOURCES`): "none" (FT/RD students),
    "bm25" / "dense" (top `n_docs` by the question query: KARD-BM25, KARD-dense), "reranked"
    (`candidate_source` top `n_candidates` rescored by `reranker` restored from
    `reranker_checkpoint`: KARD-reranker) or "silver" (BM25 by the teacher's rationale for each
    evaluated question, from `rationales_path`: the oracle row). `query_form` is the question
    query (`kard_jax.data.query`), the same setting the retrieval cache and the reranker's
    training used (the dataset gin's QUERY_FORM). `seeds`: decoding seeds (sampling) for a mean
    and std. `method`: the row's name in the results table (e.g. "kard_reranker").
    """
    from kard_jax.inference import passages as passages_lib

    if passage_source not in passages_lib.PASSAGE_SOURCES:
        raise InputError(f"passage_source must be one of {passages_lib.PASSAGE_SOURCES}, got {passage_source!r}",
                         field="passage_source")
    check_query_form(query_form)
    if passage_source != "none" and kb_dir is None:
        raise InputError(f"passage_source={passage_source!r} needs kb_dir (KB_DIR)", field="kb_dir")
    examples = read_examples(examples_path, format=examples_format, dataset=dataset)[:limit]
    if not examples:
        raise InputError("no examples to evaluate", path=examples_path)
    template = prompts.template_for(prompt_template or examples[0].dataset)
    tokenizer = Tokenizer(vocab_path)
    params = jax.device_get(load_student_params(checkpoint, model_config))

    info = {"source": passage_source, "method": method or passage_source, "student": os.path.abspath(checkpoint),
            "examples": os.path.abspath(examples_path), "dataset": examples[0].dataset, "n_docs": n_docs,
            "query_form": query_form}
    if passage_source == "none":
        passages_for = passages_lib.no_passages
    else:
        kb = passages_lib.KnowledgeBase(kb_dir)
        if passage_source == "silver":
            if rationales_path is None:
                raise InputError("passage_source='silver' needs the teacher's rationales for the evaluated examples "
                                 "(RATIONALES_PATH: runs/teacher.gin run on this examples file)",
                                 field="rationales_path")
            from kard_jax.teacher.store import read_rationales

            fallback = passages_lib.bm25_ranker(kb, max(n_docs, 1), query_form)
            ranker = passages_lib.silver_ranker(kb, max(n_docs, 1), read_rationales(rationales_path), fallback)
            info["questions_without_rationale"] = ranker.missing(examples)  # ranked by BM25 by question
            info["silver_fallback"] = "bm25"
            info["rationales"] = os.path.abspath(rationales_path)
        else:
            first_stage = candidate_source if passage_source == "reranked" else passage_source
            k = n_candidates if passage_source == "reranked" else max(n_docs, 1)
            if first_stage == "bm25":
                ranker = passages_lib.bm25_ranker(kb, k, query_form)
            elif first_stage == "dense":
                ranker = passages_lib.dense_ranker(kb, k, query_form, embedder)
            else:
                raise InputError(f"candidate_source must be 'bm25' or 'dense', got {first_stage!r}",
                                 field="candidate_source")
            if passage_source == "reranked":
                if reranker is None or reranker_checkpoint is None:
                    raise InputError("passage_source='reranked' needs reranker and reranker_checkpoint "
                                     "(RERANKER_CHECKPOINT)", field="reranker_checkpoint")
                from kard_jax.inference import rerank

                reranker_params = load_reranker_params(reranker_checkpoint, reranker, query_length, candidate_length)
                ranker = rerank.reranked_ranker(
                    kb, ranker, model=reranker, params=reranker_params, tokenizer=tokenizer, query_form=query_form,
                    query_length=query_length, candidate_length=candidate_length, batch_size=batch_size,
                )
                info.update(reranker=os.path.abspath(reranker_checkpoint), n_candidates=n_candidates,
                            candidate_source=candidate_source)
        passages_for = passages_lib.passages_from(kb, ranker, n_docs)

    metrics = pipeline.evaluate(
        examples, out_dir=out_dir, model=t5.T5(model_config), params=params, tokenizer=tokenizer,
        passages_for=passages_for, input_length=input_length, decode=decode, seeds=seeds, batch_size=batch_size,
        template=template, info=info,
    )
    if jax.process_index() == 0:
        from kard_jax import gin_utils

        gin_utils.write_operative_config(out_dir)
    return metrics
