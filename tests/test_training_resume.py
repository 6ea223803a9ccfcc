"""Real `python -m kard_jax.main` training processes: kill -9 + resume is exact; SIGTERM checkpoints."""
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = pathlib.Path(__file__).resolve().parents[1]

TEST_GIN = """
from __gin__ import dynamic_registration
include 'runs/train_student.gin'
from kard_jax.models import t5
from kard_jax.training import partitioning
import tests.slow_training_data as helpers

MODEL_CONFIG = @t5.preset_config()
t5.preset_config.name = 'tiny'
t5.preset_config.vocab_size = 64
t5.preset_config.d_model = 32
t5.preset_config.d_kv = 8
t5.preset_config.d_ff = 64

TRAIN_DATA = @helpers.slow_copy_task()
helpers.slow_copy_task:
  delay_s = 0.4
  batch_size = 16
  vocab_size = 64
  max_length = 10
  num_examples = 64
LEARNING_RATE = 3e-3
partitioning.MeshConfig.data = 4
partitioning.MeshConfig.model = 2
"""


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _command(gin_file, model_dir, steps, save_period):
    return [sys.executable, "-m", "kard_jax.main", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.TRAIN_STEPS={steps}", f"--gin.SAVE_PERIOD={save_period}"]


def _start(cmd, log):
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _wait_for_step(model_dir, step, proc, timeout=240):
    target = pathlib.Path(model_dir) / "checkpoints" / str(step)
    deadline = time.time() + timeout
    while not (target / "commit_success.txt").exists():
        assert proc.poll() is None, f"process exited ({proc.returncode}) before checkpoint {step}"
        assert time.time() < deadline, f"no checkpoint {step} after {timeout}s"
        time.sleep(0.05)


def _final_params(model_dir, step):
    path = pathlib.Path(model_dir) / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as c:
        metadata = c.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        tree = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return jax.tree_util.tree_flatten_with_path(tree["params"])[0]


def test_kill9_then_rerun_resumes_and_matches_uninterrupted(tmp_path):
    gin_file = tmp_path / "test.gin"
    gin_file.write_text(TEST_GIN)
    steps, period = 8, 2
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"

    with open(tmp_path / "killed.log", "w") as log:
        proc = _start(_command(gin_file, killed_dir, steps, period), log)
        _wait_for_step(killed_dir, 4, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = sorted(int(p.name) for p in (killed_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert 4 in saved and steps not in saved

    rerun = subprocess.run(_command(gin_file, killed_dir, steps, period), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = int(re.search(r"resumed from checkpoint step (\d+)", rerun.stderr).group(1))
    assert resumed in saved and resumed >= 4

    clean = subprocess.run(_command(gin_file, clean_dir, steps, period), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "resumed from" not in clean.stderr

    got, want = _final_params(killed_dir, steps), _final_params(clean_dir, steps)
    assert len(got) == len(want) > 0
    for (path, a), (_, b) in zip(got, want):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # ...and training changed them (the comparison is not between two initialisations).
    earlier = _final_params(clean_dir, 4)
    assert not any(np.array_equal(a, b) for (_, a), (_, b) in zip(earlier, got))


def test_sigterm_checkpoints_current_step_and_exits_zero(tmp_path):
    gin_file = tmp_path / "test.gin"
    gin_file.write_text(TEST_GIN)
    model_dir = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = _start(_command(gin_file, model_dir, 200, 3), log)
        _wait_for_step(model_dir, 3, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    output = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, output[-3000:]
    stopped = int(re.search(r"preempted: saved a checkpoint at step (\d+) and stopped", output).group(1))
    assert 3 <= stopped < 200
    steps = sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == stopped
    assert (model_dir / "checkpoints" / str(stopped) / "commit_success.txt").exists()
    assert "received SIGTERM" in output
