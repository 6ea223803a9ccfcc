"""runs/export_hf.gin on bad input: one stderr line, exit code 2, nothing written; a corrupt
newest checkpoint falls back to the newest readable step (as training resume does) and says so;
relative checkpoint paths work wherever orbax is called."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from kard_jax import hf_io
from kard_jax.errors import InputError
from kard_jax.models import t5
from kard_jax.training import checkpoints, train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = t5.preset_config("tiny")  # what gin_configs/models/t5_1_1_tiny.gin sets


def _params(seed: int):
    tokens = jnp.ones((1, 4), jnp.int32)
    return jax.tree.map(np.asarray, meta.unbox(t5.T5(TINY).init(jax.random.PRNGKey(seed), tokens, tokens)["params"]))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training MODEL_DIR with steps 1 and 2 (different params), as the trainer writes it."""
    root = tmp_path_factory.mktemp("export")
    checkpointer = checkpoints.Checkpointer(root / "run", async_save=False)
    params = {}
    for step in (1, 2):
        params[step] = _params(seed=step)
        state = train_state.TrainState.create(jax.tree.map(jnp.asarray, params[step]), optax.adamw(1e-4))
        checkpointer.save(step, state, None, {"step": step})
    checkpointer.close()
    return root / "run", params


def _export(cwd, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "kard_jax.main", "--gin_file=runs/export_hf.gin", *args],
        cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    return proc


def _listing(path: pathlib.Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_missing_model_dir_macro(tmp_path):
    proc = _export(tmp_path, "--gin_file=models/t5_1_1_tiny.gin", "--gin.EXPORT_DIR='hf'")
    _assert_one_line_error(proc, "MODEL_DIR", "--gin.MODEL_DIR=")
    assert _listing(tmp_path) == []


def test_model_dir_that_does_not_exist(tmp_path):
    proc = _export(tmp_path, "--gin_file=models/t5_1_1_tiny.gin", "--gin.MODEL_DIR='runs/nope'",
                   "--gin.EXPORT_DIR='hf'")
    _assert_one_line_error(proc, str(tmp_path / "runs" / "nope"), "does not exist")
    assert _listing(tmp_path) == []


def test_wrong_model_gin_names_the_parameter_and_both_shapes(run_dir, tmp_path):
    model_dir, _ = run_dir
    before = _listing(model_dir)
    proc = _export(tmp_path, "--gin_file=models/t5_1_1_small.gin", f"--gin.MODEL_DIR='{model_dir}'",
                   "--gin.EXPORT_DIR='hf'")
    small = hf_io.expected_param_shapes(t5.preset_config("small"))
    tiny = hf_io.expected_param_shapes(TINY)
    name = "decoder/decoder_norm/scale"  # the first differing parameter in sorted order
    line = _assert_one_line_error(proc, "does not match the model",
                                  f"{name}: checkpoint {tiny[name]} vs model {small[name]}")
    assert "model gin" in line
    assert _listing(tmp_path) == [] and _listing(model_dir) == before


def _truncate(directory: pathlib.Path) -> None:
    n = 0
    for f in directory.rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            n += 1
    assert n


def test_corrupt_newest_checkpoint_falls_back_and_says_so(run_dir, tmp_path):
    model_dir, params = run_dir
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    import shutil

    shutil.copytree(model_dir, work / "runs" / "student")
    _truncate(work / "runs" / "student" / "checkpoints" / "2" / "state")
    before = _listing(work / "runs" / "student")
    # Relative MODEL_DIR / EXPORT_DIR, from a working directory holding runs/.
    proc = _export(work, "--gin_file=models/t5_1_1_tiny.gin", "--gin.MODEL_DIR='runs/student'",
                   "--gin.EXPORT_DIR='runs/hf'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint at step 2" in proc.stderr and "unreadable" in proc.stderr
    assert "using step 1 instead" in proc.stderr
    _, exported = hf_io.load_hf_params(work / "runs" / "hf")
    for got, want in zip(jax.tree.leaves(exported), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(got, want)
    assert _listing(work / "runs" / "student") == before  # a reader: nothing moved or deleted


def test_restore_params_takes_relative_paths_and_reports_all_unreadable(run_dir, tmp_path, monkeypatch):
    model_dir, params = run_dir
    monkeypatch.chdir(model_dir.parent)
    abstract = hf_io.abstract_params(TINY)
    for relative in ("run", "run/checkpoints", "run/checkpoints/1"):
        restored = checkpoints.restore_params(relative, abstract)
        want = params[1] if relative.endswith("/1") else params[2]
        for got, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(got), expected)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no checkpoint"):
        checkpoints.restore_params(tmp_path / "empty", abstract)
