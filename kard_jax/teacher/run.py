"""Teacher run modes: read examples -> (generate | import) rationales -> filter -> write.

Gin-free; gin_configs/runs/teacher.gin binds these as `kard_jax.main.execute.job`.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

from kard_jax.data.example import Example
from kard_jax.data.readers import FieldMapping, Format, read_examples
from kard_jax.errors import InputError
from kard_jax.teacher import filtering, importers, prompts, store
from kard_jax.teacher.client import SampleCache, TeacherClient, TeacherConfig


def default_cache_path(out_dir: str | os.PathLike) -> pathlib.Path:
    """`<out_dir>.teacher_cache.jsonl`, next to (not inside) the atomically replaced out_dir."""
    out_dir = pathlib.Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.teacher_cache.jsonl"


def _read(examples_path, format: Format, dataset: str | None, mapping: FieldMapping | None,
          limit: int | None) -> list[Example]:
    examples = read_examples(examples_path, format=format, dataset=dataset, mapping=mapping)
    return examples[:limit] if limit is not None else examples


def _finish(out_dir, examples: list[Example], rationales: dict[str, list[str]], *,
            filter_config: filtering.FilterConfig, inputs: dict, teacher, config: dict,
            extra_counts: dict | None = None) -> filtering.FilterReport:
    kept, report = filtering.filter_all(examples, rationales, filter_config)
    counts = report.as_dict() | (extra_counts or {})
    manifest = {"stage": "teacher", "inputs": inputs, "teacher": teacher, "counts": counts,
                "config": config | {"filter": dataclasses.asdict(filter_config)}}
    store.write_rationales(out_dir, kept, manifest)
    print(f"kard_jax.teacher: {report.summary()}; wrote {out_dir}", flush=True)
    return report


def generate_rationales(
    *,
    examples_path: str,
    out_dir: str,
    teacher: TeacherConfig,
    format: Format = "kard",
    dataset: str | None = None,
    mapping: FieldMapping | None = None,
    prompt_family: str | None = None,
    cache_path: str | None = None,
    limit: int | None = None,
    filter_config: filtering.FilterConfig = filtering.FilterConfig(),
    progress: bool = True,
) -> filtering.FilterReport:
    """Sample `teacher.n` rationales per question (resuming from the cache), filter, write out_dir.

    `prompt_family` picks the few-shot prompt ("medical" | "commonsense" | "science"); default:
    from the examples' dataset name. `limit` takes the first examples only (smoke runs).
    """
    examples = _read(examples_path, format, dataset, mapping, limit)
    if not examples:
        raise InputError("no examples", path=examples_path)
    teacher_prompt = prompts.teacher_prompt_for(prompt_family or examples[0].dataset or "")
    cache_path = pathlib.Path(cache_path) if cache_path else default_cache_path(out_dir)
    client = TeacherClient(teacher)
    with SampleCache(cache_path) as cache:
        rationales = client.generate(
            examples, cache,
            build_prompt=lambda ex: prompts.build_teacher_prompt(ex, teacher_prompt),
            build_messages=lambda ex: prompts.build_teacher_messages(ex, teacher_prompt),
            progress=progress,
        )
    print(f"kard_jax.teacher: {client.summary()}", flush=True)
    public_config = dataclasses.asdict(teacher)
    public_config.pop("api_key")
    return _finish(
        out_dir, examples, rationales, filter_config=filter_config,
        inputs={"examples": str(examples_path), "cache": str(cache_path)},
        teacher=teacher.model, config={"teacher": public_config, "prompt_family": prompt_family, "limit": limit},
        extra_counts={"usage": client.usage.as_dict(teacher)},
    )


def import_rationales(
    *,
    examples_path: str,
    rationales_path: str | None,
    out_dir: str,
    format: Format = "kard",
    dataset: str | None = None,
    mapping: FieldMapping | None = None,
    limit: int | None = None,
    allow_missing: bool = False,
    filter_config: filtering.FilterConfig = filtering.FilterConfig(),
) -> filtering.FilterReport:
    """Import rationales (a JSONL file or a directory of chat completions), filter, write out_dir.

    Every example must have rationales unless `allow_missing`; rationales for ids that are not
    among the examples are an error (they usually mean the wrong split).
    """
    if not rationales_path:
        raise ValueError("import_rationales needs rationales_path (teacher.gin: --gin.RATIONALES=...)")
    examples = _read(examples_path, format, dataset, mapping, limit)
    rationales, teachers = importers.import_rationales_from(rationales_path)
    ids = {ex.id for ex in examples}
    unknown = [qid for qid in rationales if qid not in ids]
    if unknown and limit is None:
        raise InputError(f"{len(unknown)} question ids are not in {examples_path} (first: {unknown[0]!r})",
                         path=rationales_path, field="id")
    missing = [ex.id for ex in examples if ex.id not in rationales]
    if missing and not allow_missing:
        raise InputError(f"no rationales for {len(missing)} examples (first: {missing[0]!r}); "
                         "pass allow_missing=True to keep going", path=rationales_path, field="id")
    return _finish(
        out_dir, examples, rationales, filter_config=filter_config,
        inputs={"examples": str(examples_path), "rationales": str(rationales_path)},
        teacher=teachers, config={"limit": limit, "allow_missing": allow_missing},
        extra_counts={"missing_questions": len(missing)},
    )
