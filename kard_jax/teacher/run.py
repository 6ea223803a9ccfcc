"""Teacher run modes: read examples -> (generate | import) rationales -> filter -> write.

Gin-free; gin_configs/runs/teacher.gin binds these as `kard_jax.main.execute.job`.

The wrong-answer filter is a core step of KARD: a rationale whose answer is not the gold one is
dropped. When most rationales state no answer the filter can find (no predicted-answer field is
mapped and the text names none), the filter silently does nothing, so the stage stops with an
`InputError` saying so; `allow_unjudged=True` keeps going with a warning on stderr.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

from kard_jax.data.example import Example
from kard_jax.data.readers import FieldMapping, Format, read_examples
from kard_jax.errors import InputError
from kard_jax.teacher import filtering, importers, prompts, store
from kard_jax.teacher.client import SampleCache, TeacherClient, TeacherConfig

# Share of the answer-checked rationales without any answer above which the filter "cannot work".
UNJUDGED_LIMIT = 0.5


def default_cache_path(out_dir: str | os.PathLike) -> pathlib.Path:
    """`<out_dir>.teacher_cache.jsonl`, next to (not inside) the atomically replaced out_dir."""
    out_dir = pathlib.Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.teacher_cache.jsonl"


def _read(examples_path, format: Format | FieldMapping, dataset: str | None, mapping: FieldMapping | None,
          limit: int | None) -> list[Example]:
    if not examples_path:
        raise InputError("no examples file given (teacher.gin: --gin.EXAMPLES=...)", field="EXAMPLES")
    examples = read_examples(examples_path, format=format, dataset=dataset, mapping=mapping)
    examples = examples[:limit] if limit is not None else examples
    unlabeled = [ex.id for ex in examples if ex.answer is None]
    if unlabeled:
        raise InputError(f"{len(unlabeled)} examples have no gold answer (first: {unlabeled[0]!r}); the teacher "
                         "stage needs a labeled (training) file", path=examples_path, field="answer")
    return examples


def _check_judged(report: filtering.FilterReport, *, source, answer_field: str | None, allow_unjudged: bool) -> None:
    checked, unjudged = report.answer_checked, report.unjudged
    if not checked or unjudged <= UNJUDGED_LIMIT * checked:
        return
    if answer_field:
        why = (f"{unjudged} of {checked} rationales have no answer: the answer field {answer_field!r} is unset and "
               "the text states none")
    else:
        why = (f"{unjudged} of {checked} rationales state no answer the parser can find and no answer field is "
               "mapped (RationaleMapping.answer)")
    message = (f"{why}, so the wrong-answer filter cannot work; map the rationales' answer field, or set "
               "allow_unjudged=True (teacher.gin: --gin.ALLOW_UNJUDGED=True) to keep them unjudged")
    if not allow_unjudged:
        raise InputError(message, path=source, field=answer_field or "answer")
    print(f"kard_jax.teacher: warning: {source}: {why}, so the wrong-answer filter judged only "
          f"{checked - unjudged} of them (allow_unjudged=True)", file=sys.stderr, flush=True)


def _finish(out_dir, examples: list[Example], rationales: dict[str, list[str]], *,
            filter_config: filtering.FilterConfig, inputs: dict, teacher, config: dict,
            extra_counts: dict | None = None, answers: dict | None = None, source=None,
            answer_field: str | None = None, allow_unjudged: bool = False) -> filtering.FilterReport:
    kept, report = filtering.filter_all(examples, rationales, filter_config, answers)
    _check_judged(report, source=source, answer_field=answer_field, allow_unjudged=allow_unjudged)
    counts = report.as_dict() | (extra_counts or {})
    manifest = {"stage": "teacher", "inputs": inputs, "teacher": teacher, "counts": counts,
                "config": config | {"filter": dataclasses.asdict(filter_config), "allow_unjudged": allow_unjudged}}
    store.write_rationales(out_dir, kept, manifest)
    print(f"kard_jax.teacher: {report.summary()}; wrote {out_dir}", flush=True)
    return report


def generate_rationales(
    *,
    examples_path: str,
    out_dir: str,
    teacher: TeacherConfig,
    format: Format | FieldMapping = "kard",
    dataset: str | None = None,
    mapping: FieldMapping | None = None,
    prompt_family: str | None = None,
    cache_path: str | None = None,
    limit: int | None = None,
    filter_config: filtering.FilterConfig = filtering.FilterConfig(),
    allow_unjudged: bool = False,
    progress: bool = True,
) -> filtering.FilterReport:
    """Sample `teacher.n` rationales per question (resuming from the cache), filter, write out_dir.

    `format`: a built-in examples format name or a `FieldMapping`. `prompt_family` picks the
    few-shot prompt ("medical" | "commonsense" | "science"); default: from the examples' dataset
    name. `limit` takes the first examples only (smoke runs).
    """
    if not out_dir:
        raise InputError("no output directory given (teacher.gin: --gin.OUT_DIR=...)", field="OUT_DIR")
    examples = _read(examples_path, format, dataset, mapping, limit)
    try:
        teacher_prompt = prompts.teacher_prompt_for(prompt_family or examples[0].dataset or "")
    except ValueError as e:
        raise InputError(f"{e} (set DATASET or prompt_family)", field="prompt_family") from None
    cache_path = pathlib.Path(cache_path) if cache_path else default_cache_path(out_dir)
    client = TeacherClient(teacher)
    with SampleCache(cache_path) as cache:
        try:
            rationales = client.generate(
                examples, cache,
                build_prompt=lambda ex: prompts.build_teacher_prompt(ex, teacher_prompt),
                build_messages=lambda ex: prompts.build_teacher_messages(ex, teacher_prompt),
                progress=progress,
            )
        finally:
            print(f"kard_jax.teacher: {client.summary()}", flush=True)
    public_config = dataclasses.asdict(teacher)
    public_config.pop("api_key")
    return _finish(
        out_dir, examples, rationales, filter_config=filter_config,
        inputs={"examples": str(examples_path), "cache": str(cache_path)},
        teacher=teacher.model, config={"teacher": public_config, "prompt_family": prompt_family, "limit": limit},
        extra_counts={"usage": client.usage.as_dict(teacher)}, source=cache_path, allow_unjudged=allow_unjudged,
    )


def import_rationales(
    *,
    examples_path: str,
    rationales_path: str | None,
    out_dir: str,
    format: Format | FieldMapping = "kard",
    dataset: str | None = None,
    mapping: FieldMapping | None = None,
    rationale_mapping: importers.RationaleMapping | None = None,
    limit: int | None = None,
    allow_missing: bool = False,
    allow_unjudged: bool = False,
    filter_config: filtering.FilterConfig = filtering.FilterConfig(),
) -> filtering.FilterReport:
    """Import rationales (a JSON file described by `rationale_mapping`, default `{"id",
    "rationales": [...]}` rows, or a directory of chat completions), filter, write out_dir.

    `format`: a built-in examples format name or a `FieldMapping`. Every example must have
    rationales unless `allow_missing`; rationales for questions that are not among the examples
    are an error (they usually mean the wrong split). See the module doc for `allow_unjudged`.
    """
    if not rationales_path:
        raise InputError("import_rationales needs a rationales file or directory: set --gin.RATIONALES=... "
                         "(or --gin.JOB=@kard_jax.teacher.run.generate_rationales to ask a teacher model)",
                         field="RATIONALES")
    if not out_dir:
        raise InputError("no output directory given (teacher.gin: --gin.OUT_DIR=...)", field="OUT_DIR")
    examples = _read(examples_path, format, dataset, mapping, limit)
    imported = importers.import_for_examples(rationales_path, examples, rationale_mapping)
    if imported.unknown and limit is None:
        line, what = imported.unknown[0]
        how = "question ids" if rationale_mapping is None or rationale_mapping.id else "question texts"
        raise InputError(f"{len(imported.unknown)} {how} are not in {examples_path} (first: {what!r}); wrong split?",
                         path=rationales_path, line=line,
                         field=None if rationale_mapping is None else rationale_mapping.id or rationale_mapping.question)
    rationales = imported.texts
    missing = [ex.id for ex in examples if ex.id not in rationales]
    if len(missing) == len(examples):
        raise InputError(f"no rationale belongs to any of the {len(examples)} examples of {examples_path}",
                         path=rationales_path)
    if missing and not allow_missing:
        raise InputError(f"no rationales for {len(missing)} examples (first: {missing[0]!r}); "
                         "pass allow_missing=True to keep going", path=rationales_path, field="id")
    answer_field = rationale_mapping.answer if rationale_mapping is not None else None
    return _finish(
        out_dir, examples, rationales, filter_config=filter_config,
        inputs={"examples": str(examples_path), "rationales": str(rationales_path)},
        teacher=imported.teachers, config={"limit": limit, "allow_missing": allow_missing},
        extra_counts={"missing_questions": len(missing)}, answers=imported.answers, source=rationales_path,
        answer_field=answer_field, allow_unjudged=allow_unjudged,
    )
