"""Gin includes resolve against the project's gin_configs/ whatever the working directory holds
(the README's `O=runs/strategyqa` creates a `runs/` folder, which gin used to import as a
namespace package: "expected str, bytes or os.PathLike object, not NoneType"), and parsing logs
no error-looking lines (gin's `E ... Path not found`, TensorFlow's `failed call to cuInit`)."""
import os
import pathlib
import re
import subprocess
import sys

import gin

from kard_jax import gin_utils

REPO = pathlib.Path(__file__).resolve().parents[1]
ERROR_LOOKING = re.compile(r"^E\d{4}|cuInit|CUDA error", re.MULTILINE)


def _main(args, cwd):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # conftest quiets TensorFlow; a user's shell does not
    return subprocess.run([sys.executable, "-m", "kard_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _cwd_like_a_users(tmp_path) -> pathlib.Path:
    """A working directory holding runs/ and models/ folders, with decoy gin files of the
    project's names that must NOT be picked up by includes."""
    cwd = tmp_path / "work"
    for sub in ("runs/strategyqa", "models"):
        (cwd / sub).mkdir(parents=True)
    (cwd / "runs" / "train_student.gin").write_text("this is not gin\n")
    (cwd / "models" / "t5_1_1_base.gin").write_text("this is not gin\n")
    return cwd


def test_experiment_gin_parses_from_a_cwd_with_runs_and_models(tmp_path):
    cwd = _cwd_like_a_users(tmp_path)
    proc = _main(["--gin_file=experiments/strategyqa_kard_base.gin", "--gin.MODEL_DIR='runs/strategyqa/student'",
                  "--gin.TRAIN_STEPS=2", "--gin.TRAIN_PATH='train.jsonl'", "--gin.VOCAB_PATH='vocab'",
                  "--gin.RATIONALES_PATH='r'", "--gin.RETRIEVAL_CACHE_DIR='c'", "--gin.KB_DIR='kb'",
                  "--dry_run"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run OK" in proc.stdout
    assert "strategyqa" in proc.stdout and "t5.preset_config.name = 'base'" in proc.stdout
    assert not ERROR_LOOKING.search(proc.stderr), proc.stderr[-3000:]
    assert not (cwd / "runs" / "strategyqa" / "student").exists()


def test_a_users_own_gin_file_in_the_cwd_includes_the_projects(tmp_path):
    cwd = _cwd_like_a_users(tmp_path)
    (cwd / "mine.gin").write_text("include 'runs/train_student.gin'\ninclude 'models/t5_1_1_tiny.gin'\n"
                                  "include 'runs/synthetic_copy_data.gin'\nLEARNING_RATE = 0.25\n")
    proc = _main(["--gin_file=mine.gin", "--gin.MODEL_DIR='runs/m'", "--gin.TRAIN_STEPS=1", "--dry_run"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEARNING_RATE = 0.25" in proc.stdout and "t5.preset_config.name = 'tiny'" in proc.stdout
    assert not ERROR_LOOKING.search(proc.stderr), proc.stderr[-3000:]


def test_missing_include_is_one_line_naming_the_searched_paths(tmp_path):
    cwd = _cwd_like_a_users(tmp_path)
    (cwd / "bad.gin").write_text("include 'runs/no_such_file.gin'\n")
    proc = _main(["--gin_file=bad.gin", "--dry_run"], cwd)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "runs/no_such_file.gin" in lines[0] and str(REPO / "gin_configs") in lines[0]


def test_search_order_and_gin_state_restored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "train_student.gin").write_text("decoy\n")
    paths = gin_utils.default_search_paths()
    assert paths.index(str(REPO / "gin_configs")) < paths.index(str(tmp_path))
    # Command-line files: a path that exists as given wins (the user's explicit choice) ...
    assert gin_utils.resolve_gin_file("runs/train_student.gin", paths) == str(tmp_path / "runs/train_student.gin")
    # ... else the search paths.
    assert gin_utils.resolve_gin_file("models/t5_1_1_tiny.gin", paths) == str(REPO / "gin_configs/models/t5_1_1_tiny.gin")
    before = (list(gin.config._LOCATION_PREFIXES), list(gin.config._FILE_READERS))
    gin.clear_config()
    try:
        gin_utils.parse([str(REPO / "gin_configs/experiments/strategyqa_ft_base.gin")],
                        ["MODEL_DIR = 'x'", "TRAIN_STEPS = 1", "TRAIN_PATH = 't'", "VOCAB_PATH = 'v'"])
    finally:
        gin.clear_config()
    assert (list(gin.config._LOCATION_PREFIXES), list(gin.config._FILE_READERS)) == before
