"""The README's main job (the whole pipeline on a small generated world), and the evaluation run
gin (runs/infer.gin) on what it produced: checkpoint, HF export and reranker paths."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from kard_jax import hf_io
from kard_jax.demo import pipeline, world
from kard_jax.inference.pipeline import DecodeConfig
from kard_jax.models import t5
from kard_jax.training import checkpoints, optimizers, partitioning
from tests.test_gin_configs import ROOT

CFG = t5.preset_config("tiny", vocab_size=512, d_model=32, d_kv=8, d_ff=64)
INPUT_LENGTH, MAX_DECODE = 160, 16


def test_world_is_deterministic_and_has_one_wrong_rationale_per_question():
    a, b = world.generate(world.WorldConfig(seed=3)), world.generate(world.WorldConfig(seed=3))
    assert a == b and a != world.generate(world.WorldConfig(seed=4))
    for row, rats in zip(a["train"], a["rationales"]):
        letter = "ABCD"[row["label"]]
        assert [f"({letter})" in r for r in rats["rationales"]] == [True, True, False]
        gold = row[f"ending{row['label']}"]
        assert all(gold in r for r in rats["rationales"])  # every rationale cites the deciding fact


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    summary = pipeline.run_demo(
        output_dir=str(out), model_config=CFG,
        world=world.WorldConfig(num_species=20, num_train_questions=40, num_test_questions=8),
        vocab_size=300, input_length=INPUT_LENGTH, target_length=48, batch_size=8, train_steps=6,
        optimizer=optimizers.adamw(learning_rate=1e-3), mesh_config=partitioning.MeshConfig(data=-1, model=1),
        decode=DecodeConfig(max_decode_len=MAX_DECODE),
    )
    return out, summary


def test_run_demo_end_to_end(demo):
    out, summary = demo
    assert summary["rationales_kept"] == 80  # 2 of the 3 rationales per question survive the filter
    assert summary["num_test"] == 8 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (out / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["passages"]) == 1 for r in rows)
    assert (out / "student" / "checkpoints" / "6").is_dir() and (out / "student" / "config.gin").exists()
    # The exported student is what training produced, bit for bit.
    exported_cfg, exported = hf_io.load_hf_params(out / "hf_student")
    trained = checkpoints.restore_params(out / "student", hf_io.abstract_params(CFG))
    assert exported_cfg.d_model == CFG.d_model
    for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(jax.device_get(trained))):
        np.testing.assert_array_equal(a, b)


def _main(*args):
    proc = subprocess.run([sys.executable, "-m", "kard_jax.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _model_flags():
    return ["--gin_bindings=t5.preset_config.d_model = 32", "--gin_bindings=t5.preset_config.d_kv = 8",
            "--gin_bindings=t5.preset_config.d_ff = 64"]


def _infer(out, checkpoint, eval_dir, *extra):
    return _main(
        "--gin_file=gin_configs/runs/infer.gin", "--gin_file=gin_configs/models/t5_1_1_tiny.gin", *_model_flags(),
        f"--gin.EXAMPLES_PATH='{out / 'world' / 'test.jsonl'}'", f"--gin.CHECKPOINT='{checkpoint}'",
        f"--gin.VOCAB_PATH='{out / 'vocab'}'", f"--gin.KB_DIR='{out / 'kb'}'", f"--gin.OUT_DIR='{eval_dir}'",
        "--gin.DATASET='demo'", "--gin.PROMPT_TEMPLATE='science'", f"--gin.INPUT_LENGTH={INPUT_LENGTH}",
        f"--gin.MAX_DECODE_LEN={MAX_DECODE}", *extra,
    )


def _rows(directory):
    return [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]


def test_infer_gin_reproduces_the_demo_from_checkpoint_and_from_hf_export(demo, tmp_path):
    out, summary = demo
    expected = _rows(out / "predictions")
    for name, checkpoint in (("ckpt", out / "student"), ("hf", out / "hf_student")):
        proc = _infer(out, checkpoint, tmp_path / name)
        assert "kard_jax inference: accuracy" in proc.stdout
        got = _rows(tmp_path / name)
        assert [(r["id"], r["texts"], r["passages"]) for r in got] == [
            (r["id"], r["texts"], r["passages"]) for r in expected]
        assert json.loads((tmp_path / name / "metrics.json").read_text())["accuracy"] == summary["test_accuracy"]
        assert (tmp_path / name / "config.gin").exists()


def test_reranker_trains_on_demo_outputs_and_reranks_at_inference(demo, tmp_path):
    out, _ = demo
    _main(
        "--gin_file=gin_configs/runs/train_reranker.gin", "--gin_file=gin_configs/models/t5_1_1_tiny.gin",
        *_model_flags(), f"--gin.MODEL_DIR='{tmp_path / 'reranker'}'", "--gin.TRAIN_STEPS=2", "--gin.DATASET='demo'",
        f"--gin.TRAIN_PATH='{out / 'world' / 'train.jsonl'}'", f"--gin.VOCAB_PATH='{out / 'vocab'}'",
        f"--gin.RATIONALES_PATH='{out / 'rationales'}'", f"--gin.RETRIEVAL_CACHE_DIR='{out / 'retrieval'}'",
        f"--gin.KB_DIR='{out / 'kb'}'", "--gin.N_CANDIDATES=8", "--gin.QUERY_LENGTH=48",
        "--gin.CANDIDATE_LENGTH=64", "--gin.PROJ_DIM=16",
        "--gin_bindings=registry.register_kard_tasks.prompt_template = 'science'",
    )
    _infer(out, out / "student", tmp_path / "eval", "--gin.PASSAGE_SOURCE='reranked'",
           f"--gin.RERANKER_CHECKPOINT='{tmp_path / 'reranker'}'", "--gin.RERANKER_PROJ_DIM=16",
           "--gin.N_CANDIDATES=8", "--gin.QUERY_LENGTH=48", "--gin.CANDIDATE_LENGTH=64", "--gin.N_DOCS=2")
    from kard_jax.data import prompts
    from kard_jax.data.readers import read_examples
    from kard_jax.knowledge import run as knowledge

    store, bm25 = knowledge.load_kb(out / "kb")
    examples = read_examples(out / "world" / "test.jsonl", format="kard", dataset="demo")
    top, _ = bm25.search([prompts.format_question(e) for e in examples], k=8)
    for row, cands in zip(_rows(tmp_path / "eval"), top):
        pool = {prompts.format_passage(p.title, p.text) for p in store.get_many(cands)}
        assert len(row["passages"]) == 2 and set(row["passages"]) <= pool
