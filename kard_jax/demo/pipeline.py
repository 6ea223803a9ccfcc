"""`run_demo`: the README's main job, the whole KARD comparison on a generated world.

world (held-out test creatures, paraphrased questions, distractor passages; kard_jax.demo.world)
-> a local teacher LLM endpoint (kard_jax.demo.teacher_server) called through the project's
   teacher client, for train and test questions, and the wrong-answer filter
-> knowledge base (passage store + BM25) -> retrieval with each rationale as the query
-> SentencePiece vocabulary -> seqio tasks ft / rd / kard / reranker
-> FT, RD and KARD students and the reranker, each trained by `trainer.train`
-> evaluation on the held-out test creatures: FT, RD (no knowledge), KARD with BM25-by-question,
   reranked and silver (teacher-rationale) passages (`inference.run.infer`), reranker Hits@k
   against the silver passages (`inference.reranker_eval`)
-> the results table (markdown + PNG) and a Hugging Face export of the KARD student.

Every stage is the library's own run-mode function; this module only wires their outputs
together, so the demo exercises what a researcher runs on real data.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

from kard_jax.demo import world as world_lib
from kard_jax.inference import pipeline as inference
from kard_jax.models import t5
from kard_jax.training import optimizers, partitioning

DATASET = "demo"
TEMPLATE = "science"
QUERY_FORM = "question"
METHODS = ("ft", "rd", "kard_bm25", "kard_reranker", "silver")


@dataclasses.dataclass(frozen=True)
class StudentRun:
    """How long to train one student variant (FT's answer-only targets need fewer steps)."""

    train_steps: int = 600
    learning_rate: float = 2e-3


@dataclasses.dataclass(frozen=True)
class RerankerRun:
    train_steps: int = 300
    learning_rate: float = 1e-3
    batch_size: int = 8
    n_candidates: int = 8  # candidates per training record (half by label, half by the question)
    eval_candidates: int = 10  # BM25 top-N by the question, reranked at test time
    query_length: int = 32
    candidate_length: int = 48
    proj_dim: int = 32
    tau1: float = 1.0
    tau2: float = 1.0
    holdout_fraction: float = 0.1


class _Stages:
    """Prints one status line per stage and keeps the timings."""

    def __init__(self):
        self.start = time.time()
        self.timings: dict[str, float] = {}
        self._name, self._t = None, 0.0

    def __call__(self, name: str) -> None:
        self.done()
        self._name, self._t = name, time.time()
        print(f"\n== kard_jax demo [{time.time() - self.start:6.1f} s]: {name}", flush=True)

    def done(self) -> None:
        if self._name:
            self.timings[self._name] = round(time.time() - self._t, 1)
            self._name = None


def run_demo(
    *,
    output_dir: str,
    model_config: t5.T5Config,
    world: world_lib.WorldConfig = world_lib.WorldConfig(),
    teacher_samples: int = 3,
    teacher_wrong_rate: float = 0.2,
    vocab_size: int = 400,
    n_passages: int = 1,
    input_length: int = 128,
    target_length: int = 48,
    batch_size: int = 16,
    ft: StudentRun = StudentRun(train_steps=300),
    rd: StudentRun = StudentRun(),
    kard: StudentRun = StudentRun(),
    reranker: RerankerRun = RerankerRun(),
    mesh_config: partitioning.MeshConfig = partitioning.MeshConfig(),
    decode: inference.DecodeConfig = inference.DecodeConfig(max_decode_len=48),
    seed: int = 0,
) -> dict:
    """Runs every stage into output_dir; returns (and writes to summary.json) the results."""
    # TensorFlow/seqio enter only through kard_jax.tasks, imported here so that `--dry_run` stays light.
    from kard_jax import hf_io
    from kard_jax.inference import reranker_eval, results_table, run as infer_run
    from kard_jax.knowledge import retrieval_cache, run as knowledge
    from kard_jax.models import reranker as reranker_lib
    from kard_jax.tasks import batch_iterator, feature_converters, registry, vocab
    from kard_jax.teacher import run as teacher
    from kard_jax.teacher.client import TeacherConfig
    from kard_jax.training import trainer

    out = pathlib.Path(output_dir)
    stage = _Stages()

    stage("generate the world (train and held-out test creatures, knowledge base)")
    world_data = world_lib.generate(world)
    world_dir = world_lib.write_world(out / "world", world)
    counts = json.loads((world_dir / "manifest.json").read_text())["counts"]
    print(f"   {counts}", flush=True)

    stage(f"teacher: {teacher_samples} rationales per question from a local OpenAI-compatible endpoint "
          f"(wrong {teacher_wrong_rate:.0%} of the time), then the wrong-answer filter")
    import logging

    from kard_jax.demo import teacher_server

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    reports = {}
    with teacher_server.serve(world_data, wrong_rate=teacher_wrong_rate, seed=seed) as base_url:
        config = TeacherConfig(model="demo-teacher", base_url=base_url, api_key="local", n=teacher_samples,
                               concurrency=4, timeout_s=30.0, max_attempts=3)
        for split in ("train", "test"):  # test rationales serve the silver (oracle) row only
            reports[split] = teacher.generate_rationales(
                examples_path=str(world_dir / f"{split}.jsonl"), out_dir=str(out / f"teacher_{split}"),
                teacher=config, dataset=DATASET, prompt_family=TEMPLATE, progress=False,
            )

    stage("knowledge base: passage store + BM25")
    knowledge.build_kb(corpus_paths=[str(world_dir / "kb.jsonl")], kb_dir=str(out / "kb"), show_progress=False)

    stage("retrieval cache: BM25 with each kept rationale as the query; question candidates + labels")
    knowledge.retrieve(
        examples_path=str(world_dir / "train.jsonl"), kb_dir=str(out / "kb"), output_dir=str(out / "retrieval"),
        rationales_path=str(out / "teacher_train"), dataset=DATASET, show_progress=False,
        config=retrieval_cache.RetrievalConfig(rationale_top_k=5, question_top_k=reranker.eval_candidates,
                                               query_form=QUERY_FORM),
    )

    stage("SentencePiece vocabulary")
    vocab_dir = vocab.train_sentencepiece(
        output_dir=str(out / "vocab"), corpus_paths=[str(world_dir / "kb.jsonl")],
        dataset_paths=[str(world_dir / "train.jsonl"), str(out / "teacher_train" / "rationales.jsonl")],
        vocab_size=vocab_size, hard_vocab_limit=False, seed=seed,
    )
    spm_vocab = vocab.load_vocabulary(vocab_dir)
    if spm_vocab.vocab_size > model_config.vocab_size:
        from kard_jax.errors import InputError

        raise InputError(f"vocabulary has {spm_vocab.vocab_size} ids (with T5's 100 sentinels) but the model's "
                         f"vocab_size is {model_config.vocab_size}; lower vocab_size or raise "
                         "t5.preset_config.vocab_size", field="vocab_size")

    registry.register_kard_tasks(
        DATASET, train_path=str(world_dir / "train.jsonl"), vocab_path=str(vocab_dir),
        rationales_path=str(out / "teacher_train"), retrieval_cache_dir=str(out / "retrieval"),
        kb_dir=str(out / "kb"), n_passages=n_passages, input_length=input_length,
        target_length=target_length, prompt_template=TEMPLATE, query_form=QUERY_FORM,
        reranker_max_candidates=reranker.n_candidates, reranker_holdout_fraction=reranker.holdout_fraction,
    )
    student_lengths = {"inputs": input_length, "targets": target_length}

    import shutil

    def fresh(model_dir: pathlib.Path) -> str:
        # The demo's models are its own outputs: a rerun (maybe with other settings) trains them
        # anew instead of resuming from checkpoints made for another world.
        shutil.rmtree(model_dir, ignore_errors=True)
        return str(model_dir)

    def train_student(variant: str, run: StudentRun) -> None:
        stage(f"train the {variant.upper()} student ({run.train_steps} steps)")
        data = batch_iterator.SeqioBatchIterator(
            task=registry.task_name(DATASET, variant), split="train", task_feature_lengths=student_lengths,
            feature_converter=feature_converters.student_feature_converter(), batch_size=batch_size, seed=seed,
        )
        trainer.train(
            model_dir=fresh(out / f"student_{variant}"), model=model_config, train_data=data,
            train_steps=run.train_steps, optimizer=optimizers.adamw(learning_rate=run.learning_rate),
            mesh_config=mesh_config, save_period=max(1, run.train_steps), log_period=max(1, run.train_steps // 10),
            seed=seed,
        )

    train_student("ft", ft)
    train_student("rd", rd)
    train_student("kard", kard)

    stage(f"train the reranker ({reranker.train_steps} steps; KL to the rationale's BM25 scores)")
    reranker_model = reranker_lib.RerankerModel(model_config, proj_dim=reranker.proj_dim, tau1=reranker.tau1,
                                                tau2=reranker.tau2)
    reranker_lengths = {"query": reranker.query_length, "candidates": reranker.candidate_length,
                        "labels": reranker.n_candidates}

    def reranker_data(split: str, shuffle: bool = True):
        return batch_iterator.SeqioBatchIterator(
            task=registry.task_name(DATASET, "reranker"), split=split, task_feature_lengths=reranker_lengths,
            feature_converter=feature_converters.RerankerFeatureConverter(), batch_size=reranker.batch_size,
            seed=seed, shuffle=shuffle,
        )

    trainer.train(
        model_dir=fresh(out / "reranker"), model=reranker_model, train_data=reranker_data("train"),
        eval_data=reranker_data("validation", shuffle=False) if reranker.holdout_fraction > 0 else None,
        eval_period=max(1, reranker.train_steps // 3), eval_steps=4,
        train_steps=reranker.train_steps, optimizer=optimizers.adamw(learning_rate=reranker.learning_rate),
        mesh_config=mesh_config, save_period=max(1, reranker.train_steps),
        log_period=max(1, reranker.train_steps // 10), seed=seed,
    )

    evals = {}
    common = dict(examples_path=str(world_dir / "test.jsonl"), model_config=model_config, vocab_path=str(vocab_dir),
                  kb_dir=str(out / "kb"), n_docs=n_passages, query_form=QUERY_FORM, input_length=input_length,
                  decode=decode, batch_size=32, dataset=DATASET, prompt_template=TEMPLATE)
    rows = {
        "ft": dict(checkpoint="student_ft", passage_source="none"),
        "rd": dict(checkpoint="student_rd", passage_source="none"),
        "kard_bm25": dict(checkpoint="student_kard", passage_source="bm25"),
        "kard_reranker": dict(checkpoint="student_kard", passage_source="reranked", reranker=reranker_model,
                              reranker_checkpoint=str(out / "reranker"), n_candidates=reranker.eval_candidates,
                              query_length=reranker.query_length, candidate_length=reranker.candidate_length),
        "silver": dict(checkpoint="student_kard", passage_source="silver", rationales_path=str(out / "teacher_test")),
    }
    for method, kwargs in rows.items():
        stage(f"evaluate {method} on the held-out test creatures")
        kwargs = dict(kwargs, checkpoint=str(out / kwargs["checkpoint"]))
        evals[method] = infer_run.infer(out_dir=str(out / "eval" / method), method=method, **common, **kwargs)

    stage("reranker Hits@k against the silver passages (test questions)")
    ranking = reranker_eval.eval_reranker(
        examples_path=str(world_dir / "test.jsonl"), rationales_path=str(out / "teacher_test"),
        kb_dir=str(out / "kb"), out_dir=str(out / "eval" / "reranker_hits"), query_form=QUERY_FORM,
        n_candidates=reranker.eval_candidates, dataset=DATASET, reranker=reranker_model,
        reranker_checkpoint=str(out / "reranker"), vocab_path=str(vocab_dir), query_length=reranker.query_length,
        candidate_length=reranker.candidate_length, seed=seed,
    )

    stage("results table")
    table = results_table.results_table(runs=[str(out / "eval" / m) for m in rows], out_dir=str(out),
                                        title="KARD demo: held-out test creatures")

    stage("export the KARD student for transformers")
    from kard_jax.inference.run import load_student_params
    import jax

    params = jax.device_get(load_student_params(out / "student_kard", model_config))
    hf_io.export_hf(params, model_config, out / "hf_student", spiece_model=pathlib.Path(vocab_dir) / "spiece.model",
                    overwrite=True)
    stage.done()

    test_phrasing = json.loads((world_dir / "questions.json").read_text())
    by_phrasing = _accuracy_by_phrasing(out / "eval", rows, test_phrasing)
    summary = {
        "accuracy": {m: round(evals[m]["accuracy"], 4) for m in rows},
        "accuracy_by_phrasing": by_phrasing,
        "chance_accuracy": 0.25,
        "reranker_hits": {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
                          for name, m in ranking["rankings"].items()},
        "num_test": evals["ft"]["num_examples"],
        "teacher": {split: r.as_dict() for split, r in reports.items()},
        "seed": seed,
        "seconds": stage.timings | {"total": round(time.time() - stage.start, 1)},
        "hf_export": str(out / "hf_student"),
    }
    from kard_jax.knowledge import atomic

    atomic.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"\n{table}\n\nkard_jax demo done in {summary['seconds']['total']:.0f} s; results in {out}/results.md "
          f"and {out}/results.png, TensorBoard logs under {out}/student_*/ and {out}/reranker/", flush=True)
    return summary


def _accuracy_by_phrasing(eval_dir: pathlib.Path, rows, questions: dict) -> dict:
    out = {}
    for method in rows:
        lines = (eval_dir / method / "predictions.jsonl").read_text().splitlines()
        per: dict[str, list[bool]] = {}
        for line in lines:
            p = json.loads(line)
            per.setdefault(questions[p["id"]]["phrasing"], []).append(bool(p["correct"]))
        out[method] = {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())}
    return out
