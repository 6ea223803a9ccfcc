"""A command-line override that sets nothing the run uses is an error naming the closest name,
with --dry_run and for real (gin alone accepts any new macro: the run then silently used the
default)."""
import os
import pathlib
import subprocess
import sys

import gin
import pytest

from kard_jax import gin_utils

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["--gin_file=runs/train_student.gin", "--gin_file=models/t5_1_1_tiny.gin",
         "--gin_file=runs/synthetic_copy_data.gin", "--gin.TRAIN_STEPS=1"]


def _main(args, cwd=REPO):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kard_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(proc) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "for_real"])
def test_misspelled_macro_fails_with_the_closest_name(tmp_path, dry_run):
    model_dir = tmp_path / "run"
    proc = _main(TRAIN + [f"--gin.MODEL_DIR='{model_dir}'", "--gin.LEARNING_RATEE=3e-3"]
                 + (["--dry_run"] if dry_run else []))
    line = _one_error_line(proc)
    assert "LEARNING_RATEE" in line and "did you mean LEARNING_RATE?" in line, line
    assert "dry run OK" not in proc.stdout
    assert not model_dir.exists()  # nothing written


def test_the_right_macro_is_accepted_and_used(tmp_path):
    proc = _main(TRAIN + [f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.LEARNING_RATE=3e-3", "--dry_run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEARNING_RATE = 0.003" in proc.stdout


def test_a_defined_macro_the_job_never_reads_is_refused_and_says_who_reads_it(tmp_path):
    # HF_CHECKPOINT_DIR is read by hf_io.initial_params, which runs only with INITIAL_CHECKPOINT set to it.
    base = TRAIN + [f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.HF_CHECKPOINT_DIR='/some/flan-t5'", "--dry_run"]
    line = _one_error_line(_main(base))
    assert "HF_CHECKPOINT_DIR" in line and "hf_io.initial_params" in line, line
    ok = _main(base + ["--gin.INITIAL_CHECKPOINT=@hf_io.initial_params"])
    assert ok.returncode == 0, ok.stderr[-3000:]


def test_misspelled_parameter_gets_a_suggestion(tmp_path):
    line = _one_error_line(_main(TRAIN + [f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.trainer.train.seedd=3",
                                          "--dry_run"]))
    assert "seedd" in line and "did you mean seed?" in line, line


def _parse_train(bindings):
    gin.clear_config()
    try:
        gin_utils.parse(["runs/train_student.gin", "models/t5_1_1_tiny.gin", "runs/synthetic_copy_data.gin"],
                        ["MODEL_DIR = '/tmp/unused'", "TRAIN_STEPS = 1", *bindings])
    finally:
        gin.clear_config()


def test_parse_accepts_overrides_of_used_names_and_refuses_the_rest():
    _parse_train(["SEED = 3", "optimizers.adamw.b1 = 0.8", "partitioning.MeshConfig.model = 1"])
    # Called by kard_jax itself on every run, not through the job's references.
    _parse_train(["cpu_runtime.configure.retain_memory = False", "cpu_runtime.train_step_compiler_options.options = {}",
                  "cpu_runtime.decode_compiler_options.options = {}"])
    with pytest.raises(gin_utils.UnusedBindingError, match="did you mean SEED"):
        _parse_train(["SEEED = 3"])
    # A configurable the run gin binds but the job never calls.
    with pytest.raises(gin_utils.UnusedBindingError, match="initial_params"):
        _parse_train(["hf_io.initial_params.hf_dir = '/x'"])


def test_without_a_job_a_binding_must_name_something_the_files_define():
    gin.clear_config()
    try:
        gin_utils.parse(["models/t5_1_1_tiny.gin"], ["MODEL_CONFIG = @t5.preset_config()"])
        gin.clear_config()
        with pytest.raises(gin_utils.UnusedBindingError, match="did you mean MODEL_CONFIG"):
            gin_utils.parse(["models/t5_1_1_tiny.gin"], ["MODEL_CONFIGG = 1"])
    finally:
        gin.clear_config()
