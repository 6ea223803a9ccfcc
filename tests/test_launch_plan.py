"""The --dry_run launch plan: per-device bytes from the real shardings vs a hand computation."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from kard_jax.errors import InputError
from kard_jax.models import t5
from kard_jax.training import launch_plan, optimizers, partitioning

REPO = pathlib.Path(__file__).resolve().parents[1]
GIN = REPO / "gin_configs"

# The tiny preset, written out: d_model 64, 4 heads x d_kv 16, d_ff 128 (gated), vocab 512,
# 2 + 2 layers, 32 relative-position buckets per stack, untied lm_head.
D, H, KV, FF, V, L, BUCKETS = 64, 4, 16, 128, 512, 2, 32
ATTN = 4 * D * H * KV                       # q, k, v, o
MLP = 3 * D * FF                            # wi_0, wi_1, wo
NORMS = (2 * L + 1) + (3 * L + 1)           # encoder: 2 per layer + final; decoder: 3 per layer + final
RELPOS = 2 * BUCKETS * H                    # one [buckets, heads] table in each stack
N = V * D + L * (ATTN + MLP) + L * (2 * ATTN + MLP) + NORMS * D + RELPOS + D * V
F32 = 4
ADAMW_COUNTERS = 2 * 4                      # int32 step counts: scale_by_adam and the lr schedule


def _tiny():
    return t5.preset_config("tiny")


def _adamw_state(param_bytes: int) -> int:
    return 2 * param_bytes + ADAMW_COUNTERS  # mu and nu, float32 like the params


def hand_per_device_param_bytes(data: int, model: int, fsdp: bool) -> int:
    """Every parameter except the relpos tables has exactly one `embed` dimension (64 divides 8)."""
    if not fsdp and model == 1:
        return N * F32
    embed = data if fsdp else 1
    # model axis: vocab, mlp, heads / joined_kv are split; norm scales and relpos buckets are not.
    rest = N - NORMS * D - RELPOS
    return F32 * (rest // (embed * model) + NORMS * D // embed + RELPOS // model)


@pytest.mark.parametrize(
    "rules, data, model, fsdp",
    [
        (partitioning.data_parallel_logical_axis_rules(), -1, 1, False),
        (partitioning.fsdp_logical_axis_rules(), -1, 1, True),
        (partitioning.fsdp_logical_axis_rules(), 4, 2, True),
    ],
    ids=["dp", "fsdp", "fsdp+tp"],
)
def test_plan_bytes_equal_hand_computation_on_8_devices(rules, data, model, fsdp):
    plan = launch_plan.plan_launch(_tiny(), optimizers.adamw(), partitioning.MeshConfig(data=data, model=model),
                                   rules, num_devices=8)
    assert plan.num_params == N
    assert plan.param_bytes == N * F32
    assert plan.opt_state_bytes == _adamw_state(N * F32)
    want = hand_per_device_param_bytes(8 // model, model, fsdp)
    assert plan.param_bytes_per_device == want
    assert plan.opt_state_bytes_per_device == _adamw_state(want)
    assert plan.total_bytes_per_device == 2 * want + _adamw_state(want)


def test_abstract_mesh_larger_than_the_local_devices():
    # 32 devices while the test process has 8: only an abstract mesh can hold this plan.
    plan = launch_plan.plan_launch(_tiny(), None, partitioning.MeshConfig(), partitioning.fsdp_logical_axis_rules(),
                                   num_devices=32)
    assert plan.mesh_shape == {"data": 32, "model": 1}
    assert plan.param_bytes_per_device == F32 * ((N - RELPOS) // 32 + RELPOS)
    assert plan.sharded_dims == {("embed", "data"): plan.num_param_arrays - 2}


def test_plan_refuses_what_cannot_fit():
    plan = launch_plan.plan_launch(_tiny(), None, partitioning.MeshConfig(), None, num_devices=8)
    with pytest.raises(InputError, match="does not fit"):
        launch_plan.plan_launch(_tiny(), None, partitioning.MeshConfig(), None, num_devices=8,
                                device_memory_bytes=plan.total_bytes_per_device - 1)


def _dry_run(*extra):
    env = dict(os.environ)  # conftest's 8 simulated CPU devices
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "kard_jax.main", f"--gin_file={GIN / 'runs/train_student.gin'}",
           f"--gin_file={GIN / 'models/t5_1_1_tiny.gin'}", f"--gin_file={GIN / 'runs/synthetic_copy_data.gin'}",
           "--gin.MODEL_DIR='/nonexistent/never_written'", "--gin.TRAIN_STEPS=10", "--dry_run", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _printed(stdout: str, what: str) -> int:
    return int(re.search(rf"launch plan: {what}: .*per device (\d+) bytes", stdout).group(1))


@pytest.mark.parametrize("partitioning_gin, fsdp", [("dp.gin", False), ("fsdp.gin", True)])
def test_dry_run_prints_the_per_device_plan(partitioning_gin, fsdp):
    out = _dry_run(f"--gin_file={GIN / 'partitioning' / partitioning_gin}")
    assert out.returncode == 0, out.stderr[-3000:]
    want = hand_per_device_param_bytes(8, 1, fsdp)
    assert "mesh data=8 x model=1 (8 devices" in out.stdout
    assert _printed(out.stdout, "parameters") == want
    assert _printed(out.stdout, "optimizer state") == _adamw_state(want)
    assert "dry run OK" in out.stdout
    assert not pathlib.Path("/nonexistent/never_written").exists()


def test_dry_run_refuses_a_mesh_that_cannot_shard_a_dimension():
    # 8-way tensor parallelism: the tiny model's 4 heads do not split over a model axis of 8.
    out = _dry_run(f"--gin_file={GIN / 'partitioning/tp.gin'}", "--gin.MODEL_PARALLEL=8", "--plan_devices=8")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    ours = [line for line in out.stderr.splitlines() if line.startswith("kard_jax:")]
    assert len(ours) == 1, out.stderr[-3000:]
    line = ours[0]
    assert "Traceback" not in out.stderr
    m = re.search(r"parameter '([^']+)' dimension (\d+) has size (\d+), not divisible by logical axis 'heads' "
                  r"-> mesh axis 'model' of size 8", line)
    assert m, line
    assert m.group(3) == str(H)
    assert m.group(1).split("/")[0] in ("encoder", "decoder")
    assert "dry run OK" not in out.stdout


def test_dry_run_of_a_job_that_is_not_training_prints_no_plan():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-m", "kard_jax.main", f"--gin_file={GIN / 'runs/build_kb.gin'}",
         "--gin.CORPUS_PATHS=['/nonexistent/corpus.jsonl']", "--gin.KB_PATH='/nonexistent/kb'", "--dry_run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run OK" in out.stdout and "launch plan" not in out.stdout
