"""SIGTERM during start-up (before the training loop's own handler) ends in a clean exit, not 143.

`blocking_train_data` is gin-importable: `trainer.train` calls it while initialising (after the
mesh, the model directory and the operative config, before restore), it marks that moment with a
file and then blocks, so the test signals the process at a known point of initialisation.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def blocking_train_data(*, ready_file: str, timeout_s: float = 240.0):
    pathlib.Path(ready_file).write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError("blocking_train_data was not interrupted")


TEST_GIN = """
from __gin__ import dynamic_registration
include 'runs/train_student.gin'
include 'models/t5_1_1_tiny.gin'
import tests.test_sigterm_init as helpers

TRAIN_DATA = @helpers.blocking_train_data
helpers.blocking_train_data.ready_file = '{ready}'
"""


def _run_and_terminate(tmp_path, model_dir):
    ready = tmp_path / "ready"
    gin_file = tmp_path / "test.gin"
    gin_file.write_text(TEST_GIN.format(ready=ready))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "kard_jax.main", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
           "--gin.TRAIN_STEPS=5"]
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the trainer never reached its data"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return proc.returncode, (tmp_path / "run.log").read_text()


def test_sigterm_during_initialisation_exits_cleanly(tmp_path):
    model_dir = tmp_path / "run"
    returncode, output = _run_and_terminate(tmp_path, model_dir)
    assert returncode == 0, output[-3000:]  # not -15 / 143 (killed by the signal)
    assert "received SIGTERM outside the training loop; stopped cleanly" in output
    assert "Traceback" not in output
    assert "was not interrupted" not in output
    # The run got as far as writing its config (so the signal came during initialisation), and
    # nothing half-made was left: no checkpoint step, no temporary files in MODEL_DIR.
    assert (model_dir / "config.gin").is_file()
    checkpoints = model_dir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]
