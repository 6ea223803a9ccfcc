"""`kard_jax.cpu_runtime`: the glibc settings remove the page faults of re-allocating big
buffers (counted by the kernel: getrusage's minor faults; the benchmarks print them per train
step), and are applied on CPU only, before a JAX backend exists; the XLA:CPU compile options
reach CPU compilations only. The allocator cases run in a fresh interpreter (those settings are
process-wide)."""
import os
import subprocess
import sys

import pytest

_REALLOCATE = r"""
import ctypes, resource, sys
from kard_jax import cpu_runtime
applied = cpu_runtime.configure(retain_memory=sys.argv[1] == "retain")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20  # far above glibc's largest mmap threshold (32 MiB): what XLA:CPU's big buffers are
for _ in range(2):  # the heap reaches its high-water mark
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # what every train step does: free a big buffer, allocate it again, write it
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
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
    applied, faults = _run(_REALLOCATE, "retain")
    default_applied, default_faults = _run(_REALLOCATE, "default")
    assert (applied, default_applied) == ("True", "False")
    # glibc defaults: each 64 MiB block is a fresh mmap, faulted in page by page (16 Ki pages).
    assert int(default_faults) >= 10 * 16384
    assert int(faults) < 100, faults


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


def test_train_step_options_on_cpu_meshes_only():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from kard_jax import cpu_runtime

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    assert cpu_runtime.train_step_compiler_options(mesh) == cpu_runtime.CPU_TRAIN_STEP_OPTIONS

    class _Tpu:
        platform = "tpu"

    class _TpuMesh:
        devices = np.array([_Tpu(), _Tpu()])

    assert cpu_runtime.train_step_compiler_options(_TpuMesh()) is None


def test_cpu_jit_compiles_with_its_options_on_the_cpu_and_computes_the_same():
    """The decode functions' wrapper: on the CPU the options reach XLA (no YNNPACK fusion is left
    in the compiled program, where plain jax.jit has one for the same matmul) and the result is
    the same to float rounding."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kard_jax import cpu_runtime

    def step(x, w):
        return jax.nn.gelu(x @ w)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 256)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(256, 512)), jnp.float32)
    tuned = cpu_runtime.cpu_jit(step, cpu_runtime.CPU_DECODE_OPTIONS)
    assert tuned.__name__ == "step"
    plain_hlo = jax.jit(step).lower(x, w).compile().as_text()
    tuned_hlo = tuned.lower(x, w).compile().as_text()
    assert "ynn_fusion" in plain_hlo  # XLA:CPU's default: the matmul is a YNNPACK fusion
    assert "ynn_fusion" not in tuned_hlo
    np.testing.assert_allclose(np.asarray(tuned(x, w)), np.asarray(jax.jit(step)(x, w)), rtol=1e-5, atol=1e-5)


def test_compile_options_are_gin_settings_read_at_each_call():
    """gin replaces the XLA:CPU options of the train step and of decoding; `cpu_jit` reads its
    options at each call, so a new binding compiles a new program (never a stale one), and a
    misspelt option is an InputError naming the gin setting (one line from `kard_jax.main`)."""
    import gin
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from kard_jax import cpu_runtime
    from kard_jax.errors import InputError
    from kard_jax.models import decoding, t5

    def step(x, w):
        return jax.nn.gelu(x @ w)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 256)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(256, 512)), jnp.float32)
    setting = "cpu_runtime.decode_compiler_options.options"
    tuned = cpu_runtime.cpu_jit(step, cpu_runtime.decode_compiler_options, setting=setting)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    gin.clear_config()
    try:
        assert "ynn_fusion" not in tuned.lower(x, w).compile().as_text()  # CPU_DECODE_OPTIONS
        with gin.unlock_config():
            gin.bind_parameter(setting, {})
            gin.bind_parameter("cpu_runtime.train_step_compiler_options.options", {})
        assert "ynn_fusion" in tuned.lower(x, w).compile().as_text()  # XLA's default fuses the matmul
        assert cpu_runtime.train_step_compiler_options(mesh) == {}

        with gin.unlock_config():
            gin.bind_parameter(setting, {"xla_cpu_no_such_option": True})
            gin.bind_parameter("cpu_runtime.train_step_compiler_options.options",
                               {"xla_cpu_use_onednn": "yes"})
        with pytest.raises(InputError, match=r"^cpu_runtime\.decode_compiler_options\.options = .*"
                                             r"No such compile option: 'xla_cpu_no_such_option'"):
            tuned(x, w)
        model = t5.T5(t5.T5Config.from_preset("tiny"))
        tokens = jnp.ones((1, 4), jnp.int32)
        params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens)["params"]
        with pytest.raises(InputError, match=r"^cpu_runtime\.decode_compiler_options\.options = "):
            decoding.greedy_decode(model, params, tokens, max_decode_len=2)
        with pytest.raises(InputError, match=r"^cpu_runtime\.train_step_compiler_options\.options = "
                                             r".*xla_cpu_use_onednn"):
            cpu_runtime.train_step_compiler_options(mesh)
        with gin.unlock_config():
            gin.bind_parameter("cpu_runtime.train_step_compiler_options.options", {"xla_cpu_use_onednn": [True]})
        with pytest.raises(InputError, match="expected a dict of XLA option names to strings, numbers or booleans"):
            cpu_runtime.train_step_compiler_options(mesh)
    finally:
        gin.clear_config()
