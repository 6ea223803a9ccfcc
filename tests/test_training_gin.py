"""`python -m kard_jax.main --dry_run` on the training gins: good configs parse, bad ones fail early."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = ["--gin_file=runs/train_student.gin", "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/synthetic_copy_data.gin"]


def _dry_run(args, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kard_jax.main", *args, "--dry_run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_train_student_dry_run_parses_and_prints_bindings(tmp_path):
    model_dir = tmp_path / "run"
    r = _dry_run(BASE + [f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=3",
                         "--gin_file=partitioning/fsdp.gin"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dry run OK" in r.stdout
    assert "trainer.train.logical_axis_rules = @partitioning.fsdp_logical_axis_rules()" in r.stdout
    assert not model_dir.exists()  # nothing was run


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gin.trainer.train.not_a_parameter=1"], "not_a_parameter"),
        (["--gin.trainer.trian.train_steps=1"], "trainer.trian"),
        ([], "MODEL_DIR/macro.value set to `%gin.REQUIRED` but not subsequently overridden"),
    ],
    ids=["unknown-binding", "typo-in-configurable", "missing-required-macro"],
)
def test_bad_gin_fails_in_dry_run_with_gins_message(tmp_path, extra, message):
    model_dir = tmp_path / "run"
    args = BASE + ["--gin.TRAIN_STEPS=3"] + extra
    if "REQUIRED" not in message:
        args.append(f"--gin.MODEL_DIR='{model_dir}'")
    r = _dry_run(args, tmp_path)
    assert r.returncode != 0
    assert "invalid gin config" in r.stderr and message in r.stderr, r.stderr[-2000:]
    assert "dry run OK" not in r.stdout
    assert not model_dir.exists()
