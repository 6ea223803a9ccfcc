"""A materialized task cache records the settings and inputs it was built from; reading it with
other settings (or changed inputs) is an InputError naming what differs, never a silent reuse."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from kard_jax.errors import InputError  # noqa: E402
from kard_jax.knowledge.passage_store import build_passage_store  # noqa: E402
from kard_jax.tasks import cache, feature_converters, registry, vocab as vocab_lib  # noqa: E402
from kard_jax.tasks.batch_iterator import SeqioBatchIterator  # noqa: E402
from kard_jax.teacher.store import write_rationales  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
QUESTIONS = [
    {"id": "q1", "sent1": "What do plants need to grow?", "sent2": "", "ending0": "sunlight", "ending1": "rocks",
     "ending2": "plastic", "ending3": "noise", "label": 0},
    {"id": "q2", "sent1": "Which is a metal?", "sent2": "", "ending0": "wood", "ending1": "iron",
     "ending2": "glass", "ending3": "water", "label": 1},
]
KB = [
    {"id": "p_sun", "title": "Sun", "text": "The sun gives light and heat to the earth."},
    {"id": "p_plant", "title": "Plant", "text": "Plants use sunlight, water and air to grow food."},
    {"id": "p_iron", "title": "Iron", "text": "Iron is a strong metal that can rust in wet air."},
]
RATIONALES = {"q1": ["Plants make food from sunlight."], "q2": ["Iron is a metal found in rocks."]}
RATIONALE_ROWS = [
    {"question_id": "q1", "rationale_index": 0, "rationale": RATIONALES["q1"][0],
     "passage_ids": ["p_sun", "p_plant", "p_iron"], "scores": [3.0, 2.0, 1.0]},
    {"question_id": "q2", "rationale_index": 0, "rationale": RATIONALES["q2"][0],
     "passage_ids": ["p_iron", "p_sun", "p_plant"], "scores": [5.0, 2.0, 0.1]},
]
QUESTION_ROWS = [
    {"question_id": q, "candidate_ids": ["p_plant", "p_iron", "p_sun"], "question_scores": [2.0, 1.0, 0.5],
     "labels": {"0": [2.0, 1.0, 3.0]}} for q in ("q1", "q2")
]


def _jsonl(path: pathlib.Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stale")
    retrieval = root / "retrieval"
    retrieval.mkdir()
    files = [_jsonl(retrieval / "question_candidates-00000-of-00001.jsonl", QUESTION_ROWS),
             _jsonl(retrieval / "rationale_retrieval-00000-of-00001.jsonl", RATIONALE_ROWS)]
    (retrieval / "manifest.json").write_text(json.dumps(
        {"format": "kard_jax.retrieval_cache/1", "files": [pathlib.Path(f).name for f in files]}))
    write_rationales(root / "teacher", RATIONALES, {"teacher": "fixture"})
    build_passage_store([_jsonl(root / "kb.jsonl", KB)], root / "kb", show_progress=False)
    words = " ".join([json.dumps(QUESTIONS), json.dumps(KB), json.dumps(RATIONALES)]).replace('"', " ").split()
    rng = np.random.default_rng(0)
    _jsonl(root / "corpus.jsonl", [{"text": " ".join(rng.choice(words, size=12))} for _ in range(300)])
    vocab_lib.train_sentencepiece(output_dir=str(root / "vocab"), corpus_paths=[str(root / "corpus.jsonl")],
                                  vocab_size=150, hard_vocab_limit=False, show_progress=False)
    return dict(train_path=_jsonl(root / "train.jsonl", QUESTIONS), vocab_path=str(root / "vocab"),
                rationales_path=str(root / "teacher"), retrieval_cache_dir=str(retrieval), kb_dir=str(root / "kb"))


def _register(inputs, **overrides):
    kwargs = dict(inputs, n_passages=1, input_length=256, target_length=64, prompt_template="science")
    kwargs.update(overrides)
    return registry.register_kard_tasks("stale", **kwargs)


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    """kard_stale_kard and kard_stale_ft materialized with n_passages=1."""
    out = tmp_path_factory.mktemp("task_cache")
    _register(inputs)
    for task in ("kard_stale_kard", "kard_stale_ft"):
        cache.write_task_cache(task, "train", out, num_shards=1, show_progress=False)
    return out


def test_manifest_records_settings_and_input_hashes(inputs, built):
    manifest = json.loads((cache.task_cache_dir(built, "kard_stale_kard") / "manifest.train.json").read_text())
    record = manifest["built_from"]
    assert record["settings"]["n_passages"] == 1 and record["settings"]["input_length"] == 256
    assert set(record["inputs"]) == {"train_path", "vocab_path", "rationales_path", "retrieval_cache_dir", "kb_dir"}
    assert record["inputs"]["train_path"] == cache.content_hash(inputs["train_path"])
    # The ft task's records do not depend on retrieval, so its record leaves it out.
    ft = json.loads((cache.task_cache_dir(built, "kard_stale_ft") / "manifest.train.json").read_text())["built_from"]
    assert "n_passages" not in ft["settings"] and "retrieval_cache_dir" not in ft["inputs"]


def test_same_settings_are_read(inputs, built):
    _register(inputs)
    cache.use_cache_dir(built, "kard_stale_kard", "train")
    it = SeqioBatchIterator(task="kard_stale_kard", split="train", task_feature_lengths={"inputs": 256, "targets": 64},
                            feature_converter=feature_converters.student_feature_converter(), batch_size=2,
                            cache_dir=str(built), shard_index=0, num_shards=1, shuffle=False)
    assert next(it)["encoder_input_tokens"].shape == (2, 256)


def test_cache_built_with_one_passage_is_refused_with_two(inputs, built):
    _register(inputs, n_passages=2)
    with pytest.raises(InputError, match=r"n_passages: built with 1, now 2"):
        cache.use_cache_dir(built, "kard_stale_kard", "train")
    with pytest.raises(InputError, match=r"stale task cache.*n_passages"):  # the training path
        SeqioBatchIterator(task="kard_stale_kard", split="train", task_feature_lengths={"inputs": 256, "targets": 64},
                           feature_converter=feature_converters.student_feature_converter(), batch_size=2,
                           cache_dir=str(built), shard_index=0, num_shards=1)
    cache.use_cache_dir(built, "kard_stale_ft", "train")  # ft does not use passages: still valid


@pytest.mark.parametrize("changed", ["input_length", "rationales_path", "vocab_path", "retrieval_cache_dir",
                                     "prompt_template"])
def test_changed_setting_or_input_contents_is_named(inputs, built, tmp_path, changed):
    overrides = {}
    if changed == "input_length":
        overrides["input_length"] = 300
    elif changed == "prompt_template":
        overrides["prompt_template"] = "medical"
    elif changed == "rationales_path":
        write_rationales(tmp_path / "teacher", {**RATIONALES, "q2": ["Iron is a metal."]}, {"teacher": "other"})
        overrides[changed] = str(tmp_path / "teacher")
    else:
        copy = tmp_path / changed
        shutil.copytree(inputs[changed], copy)
        target = next(p for p in sorted(copy.iterdir()) if p.is_file())
        target.write_bytes(target.read_bytes() + b"\n")
        overrides[changed] = str(copy)
    _register(inputs, **overrides)
    with pytest.raises(InputError, match="template: built with" if changed == "prompt_template" else changed) as error:
        cache.use_cache_dir(built, "kard_stale_kard", "train")
    assert "manifest.train.json" in str(error.value)


def test_naming_the_same_template_explicitly_is_no_change(inputs, built):
    _register(inputs, prompt_template="obqa")  # obqa's template is the science family's
    cache.use_cache_dir(built, "kard_stale_kard", "train")


def test_moved_inputs_with_the_same_contents_are_fine(inputs, built, tmp_path):
    moved = {k: str(tmp_path / k) for k in ("train_path", "retrieval_cache_dir")}
    shutil.copyfile(inputs["train_path"], moved["train_path"])
    shutil.copytree(inputs["retrieval_cache_dir"], moved["retrieval_cache_dir"])
    _register(inputs, **moved)
    cache.use_cache_dir(built, "kard_stale_kard", "train")


def test_a_cache_without_a_record_is_refused(inputs, built, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(built, old)
    manifest_path = cache.task_cache_dir(old, "kard_stale_kard") / "manifest.train.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["built_from"]
    manifest_path.write_text(json.dumps(manifest))
    _register(inputs)
    with pytest.raises(InputError, match="does not record what it was built from"):
        cache.use_cache_dir(old, "kard_stale_kard", "train")


def test_training_on_a_stale_cache_fails_in_one_line_and_writes_nothing(inputs, built, tmp_path):
    model_dir = tmp_path / "run"
    args = [f"--gin.{k}='{v}'" for k, v in (
        ("TRAIN_PATH", inputs["train_path"]), ("VOCAB_PATH", inputs["vocab_path"]),
        ("RATIONALES_PATH", inputs["rationales_path"]), ("RETRIEVAL_CACHE_DIR", inputs["retrieval_cache_dir"]),
        ("KB_DIR", inputs["kb_dir"]), ("CACHE_DIR", built), ("MODEL_DIR", model_dir))]
    proc = subprocess.run(
        [sys.executable, "-m", "kard_jax.main", "--gin_file=runs/train_student.gin", "--gin_file=models/t5_1_1_tiny.gin",
         "--gin_file=runs/seqio_student_data.gin", "--gin.DATASET='stale'", "--gin.VARIANT='kard'", "--gin.PROMPT_TEMPLATE='science'",
         "--gin.N_PASSAGES=2", "--gin.INPUT_LENGTH=256", "--gin.TARGET_LENGTH=64", "--gin.BATCH_SIZE=8",
         "--gin.TRAIN_STEPS=1", *args],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "n_passages: built with 1, now 2" in lines[0]
    assert not model_dir.exists()
