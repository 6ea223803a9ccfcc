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
import numpy as np
from flax import linen as nn
from flax.core import meta

from kard_jax import hf_io
from kard_jax.data import prompts
from kard_jax.data.query import DEFAULT_QUERY_FORM, check_query_form
from kard_jax.data.readers import read_examples
from kard_jax.errors import InputError
from kard_jax.inference import pipeline
from kard_jax.models import t5
from kard_jax.tokenizer import Tokenizer



def sharded_abstract(boxed: Any, mesh: jax.sharding.Mesh, logical_axis_rules: Any = None, what: str = "parameter") -> Any:
    """ShapeDtypeStructs carrying the mesh's shardings for a boxed (`nn.Partitioned`) abstract
    params tree, derived from its logical axes as the trainer derives the train state's
    (`kard_jax.training.partitioning`); InputError naming the parameter and axis when a
    dimension does not divide."""
    from kard_jax.training import partitioning

    rules = partitioning.standard_logical_axis_rules() if logical_axis_rules is None else logical_axis_rules
    abstract = meta.unbox(boxed)
    shardings = partitioning.shardings_from_logical_specs(abstract, nn.get_partition_spec(boxed), mesh, rules, what)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def place(params: Any, abstract: Any) -> Any:
    """Host params (numpy / single-device arrays, e.g. from a Hugging Face directory) -> global
    arrays with `abstract`'s dtypes and shardings; every process passes the same values and
    keeps only its own shards (works across processes, unlike copying whole arrays)."""
    from kard_jax.training.train_state import check_params_match

    check_params_match(params, abstract)

    def put(x, a):
        x = np.asarray(jax.device_get(x), dtype=a.dtype)
        return jax.make_array_from_callback(a.shape, a.sharding, lambda idx: x[idx])

    return jax.tree.map(put, params, abstract)


def load_student_params(checkpoint: str | os.PathLike, model_config: t5.T5Config, *,
                        mesh: jax.sharding.Mesh | None = None, logical_axis_rules: Any = None) -> Any:
    """Params from a Hugging Face T5 directory (has config.json) or a training checkpoint.

    With `mesh`, restored straight into the mesh's shardings (each device reads only its shards;
    the parameters' logical axes through `logical_axis_rules`, default the standard table, as
    training shards them); without, on the host's first device.
    """
    path = pathlib.Path(checkpoint)
    if not path.exists():
        raise InputError("checkpoint not found", path=path, field="checkpoint")
    if mesh is None:
        abstract = hf_io.abstract_params(model_config)
    else:
        model = t5.T5(model_config)
        tokens = jax.ShapeDtypeStruct((1, 1), np.int32)
        boxed = jax.eval_shape(lambda e, d: model.init(jax.random.PRNGKey(0), e, d), tokens, tokens)["params"]
        abstract = sharded_abstract(boxed, mesh, logical_axis_rules)
    if (path / hf_io.CONFIG_FILE).is_file():
        params = hf_io.initial_params(path, model_config)
        return params if mesh is None else place(params, abstract)
    from kard_jax.training import checkpoints

    return checkpoints.restore_params(path, abstract)


def load_reranker_params(checkpoint: str | os.PathLike, model: Any, query_length: int, candidate_length: int, *,
                         mesh: jax.sharding.Mesh | None = None, logical_axis_rules: Any = None) -> Any:
    """A trained reranker's params (training MODEL_DIR or step directory): restored on the host,
    or with `mesh` straight into the mesh's shardings (as `load_student_params`)."""
    from kard_jax.training import checkpoints

    shapes = {"query_tokens": (1, query_length), "candidate_tokens": (1, 1, candidate_length)}
    boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))["params"]
    if mesh is not None:
        return checkpoints.restore_params(checkpoint, sharded_abstract(boxed, mesh, logical_axis_rules))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), meta.unbox(boxed))
    return checkpoints.restore_params(checkpoint, abstract)


def local_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The mesh for host-local work (retrieval: the reranker) under several processes: this
    process's devices, with the global mesh's `model` axis where it divides them (else 1)."""
    from kard_jax.training import partitioning

    if jax.process_count() == 1:
        return mesh
    local = jax.local_devices()
    model = int(mesh.shape.get(partitioning.MODEL_AXIS, 1))
    model = model if len(local) % model == 0 else 1
    return partitioning.MeshConfig(data=-1, model=model).make_mesh(local)


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
    reranker_vocab_path: str | None = None,
    mesh_config: Any = None,
    logical_axis_rules: Any = None,
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

    `mesh_config` (`partitioning.MeshConfig`; runs/infer.gin: data=-1, model=1 as training): the
    student (and reranker) are restored straight into that mesh's shardings (parameters by their
    logical axes through `logical_axis_rules`, default the standard table) and decode under it,
    the batch sharded over the data axis; under several processes each evaluates its block of the
    examples (retrieving its own passages; the reranker on its own devices) and process 0 writes
    the outputs. None: one device, the params on the host (every process evaluates everything).
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
    mesh = rules = None
    if mesh_config is not None:
        from kard_jax.training import partitioning

        mesh = mesh_config.make_mesh()
        rules = partitioning.standard_logical_axis_rules() if logical_axis_rules is None else logical_axis_rules
        params = load_student_params(checkpoint, model_config, mesh=mesh, logical_axis_rules=rules)
    else:
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

                reranker_params = load_reranker_params(
                    reranker_checkpoint, reranker, query_length, candidate_length,
                    mesh=None if mesh is None else local_mesh(mesh), logical_axis_rules=rules)
                ranker = rerank.reranked_ranker(
                    kb, ranker, model=reranker, params=reranker_params,
                    tokenizer=rerank.reranker_tokenizer(reranker_vocab_path) if reranker_vocab_path else tokenizer,
                    query_form=query_form,
                    query_length=query_length, candidate_length=candidate_length, batch_size=batch_size,
                )
                info.update(reranker=os.path.abspath(reranker_checkpoint), n_candidates=n_candidates,
                            candidate_source=candidate_source)
        passages_for = passages_lib.passages_from(kb, ranker, n_docs)

    metrics = pipeline.evaluate(
        examples, out_dir=out_dir, model=t5.T5(model_config), params=params, tokenizer=tokenizer,
        passages_for=passages_for, input_length=input_length, decode=decode, seeds=seeds, batch_size=batch_size,
        template=template, info=info, mesh=mesh, logical_axis_rules=rules,
    )
    if jax.process_index() == 0:
        from kard_jax import gin_utils

        gin_utils.write_operative_config(out_dir)
    return metrics
