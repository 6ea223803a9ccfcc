"""Outputs are readable by others: under umask 022 every file a stage writes is 0644 and every
directory 0755 (not mkstemp's / mkdtemp's private 0600 / 0700), and a normal run prints no
error-looking lines (TensorFlow's `failed call to cuInit`, gin's `E ... Path not found`).

Stages run as a user runs them (`python -m kard_jax.main`): teacher import, build_kb, retrieve,
build_vocab, materialize, export_hf; plus the operative config.gin and the atomic helpers."""
import json
import os
import pathlib
import re
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from kard_jax import gin_utils
from kard_jax.knowledge import atomic
from kard_jax.models import t5
from kard_jax.training import checkpoints, train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
ERROR_LOOKING = re.compile(r"^E\d{4}|cuInit|CUDA error", re.MULTILINE)
WORDS = ("plants need sunlight and water to grow food while iron is a strong metal that rusts in wet air "
         "and glass is made by melting sand in a hot furnace").split()


def _jsonl(path: pathlib.Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _stage(gin_file, *bindings, cwd):
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # conftest quiets TensorFlow; a user's shell does not
    old = os.umask(0o022)  # inherited by the child
    try:
        proc = subprocess.run([sys.executable, "-m", "kard_jax.main", f"--gin_file={gin_file}", *bindings], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not ERROR_LOOKING.search(proc.stderr), proc.stderr[-3000:]
    return proc


def _modes(root: pathlib.Path) -> dict[str, str]:
    """Every path under root (root included) whose mode is not 0644 (files) / 0755 (dirs)."""
    bad = {}
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if p.is_symlink():
            continue
        want = 0o755 if p.is_dir() else 0o644
        if mode != want and not (p.is_file() and mode == 0o755):  # executables may keep x bits
            bad[str(p.relative_to(root.parent))] = oct(mode)
    return bad


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Runs the stages once in a working directory; returns {stage: its output directory}."""
    work = tmp_path_factory.mktemp("modes")
    rng = np.random.default_rng(0)
    questions = [{"id": f"q{i}", "sent1": f"Which {' '.join(rng.choice(WORDS, 4))}?", "sent2": "",
                  **{f"ending{k}": str(rng.choice(WORDS)) for k in range(4)}, "label": i % 4} for i in range(6)]
    examples = _jsonl(work / "train.jsonl", questions)
    rationales = _jsonl(work / "rationales.jsonl", [
        {"id": q["id"], "rationales": [f"{' '.join(rng.choice(WORDS, 12))}. So the answer is ({'ABCD'[q['label']]})."]}
        for q in questions])
    corpus = _jsonl(work / "corpus.jsonl", [{"id": f"p{i}", "title": f"T{i}", "text": " ".join(rng.choice(WORDS, 20))}
                                            for i in range(30)])
    out = {name: work / "runs" / name for name in ("teacher", "kb", "retrieval", "vocab", "task_cache", "hf")}
    _stage("runs/teacher.gin", f"--gin.EXAMPLES='{examples}'", f"--gin.RATIONALES='{rationales}'",
           "--gin.OUT_DIR='runs/teacher'", cwd=work)
    _stage("runs/build_kb.gin", f"--gin.CORPUS_PATHS=['{corpus}']", "--gin.KB_PATH='runs/kb'", cwd=work)
    _stage("runs/retrieve.gin", f"--gin.EXAMPLES_PATH='{examples}'", "--gin.KB_PATH='runs/kb'",
           "--gin.OUTPUT_DIR='runs/retrieval'", "--gin.RATIONALES_PATH='runs/teacher'", "--gin.QUESTION_TOP_K=5",
           cwd=work)
    _stage("runs/build_vocab.gin", "--gin.VOCAB_DIR='runs/vocab'", f"--gin.CORPUS_PATHS=['{corpus}']",
           "--gin.VOCAB_SIZE=120", cwd=work)
    _stage("runs/materialize.gin", "--gin.DATASET='obqa'", "--gin.TASK='kard_obqa_kard'",
           "--gin.OUT_DIR='runs/task_cache'", f"--gin.TRAIN_PATH='{examples}'", "--gin.VOCAB_PATH='runs/vocab'",
           "--gin.RATIONALES_PATH='runs/teacher'", "--gin.RETRIEVAL_CACHE_DIR='runs/retrieval'",
           "--gin.KB_DIR='runs/kb'", "--gin.NUM_SHARDS=2", cwd=work)
    cfg = t5.preset_config("tiny")
    tokens = jnp.ones((1, 4), jnp.int32)
    params = meta.unbox(t5.T5(cfg).init(jax.random.PRNGKey(0), tokens, tokens)["params"])
    ckpt = checkpoints.Checkpointer(work / "runs" / "student", async_save=False)
    ckpt.save(1, train_state.TrainState.create(params, optax.adamw(1e-4)), None, {})
    ckpt.close()
    _stage("runs/export_hf.gin", "--gin_file=models/t5_1_1_tiny.gin", "--gin.MODEL_DIR='runs/student'",
           "--gin.EXPORT_DIR='runs/hf'", "--gin.SPIECE_MODEL='runs/vocab/spiece.model'", cwd=work)
    return out


@pytest.mark.parametrize("stage", ["teacher", "kb", "retrieval", "vocab", "task_cache", "hf"])
def test_stage_outputs_are_readable_by_others(pipeline, stage):
    root = pipeline[stage]
    assert root.is_dir() and any(root.iterdir())
    assert _modes(root) == {}
    leftovers = [p.name for p in root.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temp files or directories left next to the outputs


def test_atomic_helpers_and_operative_config_follow_the_umask(tmp_path):
    import gin

    old = os.umask(0o027)  # a stricter umask is respected, not overridden
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        atomic.write_json(tmp_path / "b.json", {"x": 1})
        atomic.write_bytes(tmp_path / "c.bin", b"x")
        with atomic.atomic_directory(tmp_path / "d") as d:
            (d / "inner").mkdir()
            fd = os.open(d / "inner" / "private", os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp makes them
            os.close(fd)
        gin.clear_config()
        gin_utils.parse(["models/t5_1_1_tiny.gin"], [])
        gin_utils.write_operative_config(tmp_path / "run")
        gin.clear_config()
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json", "c.bin", "d/inner/private", "run/config.gin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    for name in ("d", "d/inner"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o750, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin", "d", "run"]
