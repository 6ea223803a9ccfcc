"""The README's main job: the whole pipeline on a small generated world, end to end."""
import json

import jax
import numpy as np

from kard_jax import hf_io
from kard_jax.demo import pipeline, world
from kard_jax.inference.pipeline import DecodeConfig
from kard_jax.models import t5
from kard_jax.training import checkpoints, optimizers, partitioning


def test_world_is_deterministic_and_has_one_wrong_rationale_per_question():
    a, b = world.generate(world.WorldConfig(seed=3)), world.generate(world.WorldConfig(seed=3))
    assert a == b and a != world.generate(world.WorldConfig(seed=4))
    for row, rats in zip(a["train"], a["rationales"]):
        letter = "ABCD"[row["label"]]
        assert [f"({letter})" in r for r in rats["rationales"]] == [True, True, False]
        gold = row[f"ending{row['label']}"]
        assert all(gold in r for r in rats["rationales"])  # every rationale cites the deciding fact


def test_run_demo_end_to_end(tmp_path):
    cfg = t5.preset_config("tiny", vocab_size=512, d_model=32, d_kv=8, d_ff=64)
    summary = pipeline.run_demo(
        output_dir=str(tmp_path / "demo"), model_config=cfg,
        world=world.WorldConfig(num_species=20, num_train_questions=40, num_test_questions=8),
        vocab_size=300, input_length=160, target_length=48, batch_size=8, train_steps=6,
        optimizer=optimizers.adamw(learning_rate=1e-3), mesh_config=partitioning.MeshConfig(data=-1, model=1),
        decode=DecodeConfig(max_decode_len=16),
    )
    out = tmp_path / "demo"
    assert summary["rationales_kept"] == 80  # 2 of the 3 rationales per question survive the filter
    assert summary["num_test"] == 8 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (out / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["passages"]) == 1 for r in rows)
    assert (out / "student" / "checkpoints" / "6").is_dir() and (out / "student" / "config.gin").exists()

    # The exported student is what training produced, bit for bit.
    exported_cfg, exported = hf_io.load_hf_params(out / "hf_student")
    trained = checkpoints.restore_params(out / "student", hf_io.abstract_params(cfg))
    assert exported_cfg.d_model == cfg.d_model
    for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(jax.device_get(trained))):
        np.testing.assert_array_equal(a, b)
