"""`kard_jax.cpu_runtime`: the glibc settings remove the page faults of re-allocating XLA:CPU
buffers (counted by the kernel: getrusage's minor faults), and are applied on CPU only, before a
JAX backend exists. Each case runs in a fresh interpreter (the settings are process-wide)."""
import os
import subprocess
import sys

import pytest

_ALLOCATE = r"""
import resource, sys
from kard_jax import cpu_runtime
applied = cpu_runtime.configure(retain_memory=sys.argv[1] == "retain")
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)  # 64 MiB: far above glibc's largest mmap threshold (32 MiB)
f = jax.jit(lambda x: x * 2.0 + 1.0)  # a fresh 64 MiB output buffer per call
for _ in range(5):  # the heap reaches its high-water mark
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(x).block_until_ready()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(code, *args, platforms="cpu"):
    env = {**os.environ, "JAX_PLATFORMS": platforms}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_removes_the_page_faults_of_reallocating_buffers():
    applied, faults = _run(_ALLOCATE, "retain")
    default_applied, default_faults = _run(_ALLOCATE, "default")
    assert (applied, default_applied) == ("True", "False")
    # glibc defaults: each 64 MiB output is a fresh mmap, faulted in page by page (16 Ki pages).
    assert int(default_faults) > 10 * 16384 // 2
    assert int(faults) < int(default_faults) // 2, (faults, default_faults)


def test_applied_only_when_jax_can_only_use_the_cpu():
    code = "from kard_jax import cpu_runtime; print(cpu_runtime.cpu_only(), cpu_runtime.configure())"
    assert _run(code, platforms="cpu") == ["True", "True"]
    assert _run(code, platforms="tpu") == ["False", "False"]
    assert _run(code, platforms="cuda,cpu") == ["False", "False"]


def test_too_late_once_a_backend_exists_and_says_so():
    code = ("import jax; jax.devices(); from kard_jax import cpu_runtime; import logging; "
            "logging.basicConfig(); print(cpu_runtime.configure())")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False"]
    assert "after JAX started a backend" in out.stderr


def test_xla_flags_are_appended_once_and_a_users_own_value_wins():
    from kard_jax import cpu_runtime

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cpu_runtime.add_xla_flags(cpu_runtime.CPU_XLA_FLAGS, env)
    cpu_runtime.add_xla_flags(cpu_runtime.CPU_XLA_FLAGS, env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *cpu_runtime.CPU_XLA_FLAGS]
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=eltwise"}
    cpu_runtime.add_xla_flags(("--xla_cpu_experimental_ynn_fusion_type=dot",), mine)
    assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=eltwise"
