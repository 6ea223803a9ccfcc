"""Process settings that speed up XLA:CPU, applied when JAX will run on the CPU only.

XLA:CPU allocates every temporary buffer of a jitted computation on each call (a T5-small train
step at batch 8 frees and re-allocates ~4.5 GB per step). With glibc's default malloc, buffers
above its mmap threshold are fresh `mmap`s and the per-thread arenas hand freed memory back to the
kernel (`MADV_DONTNEED`), so every step page-faults the same gigabytes back in and the kernel
zeroes them: measured on a 2-core AMD EPYC (AVX2), ~1.15 M minor page faults and ~3.6 s of
system CPU time per step, a sixth of the step's CPU time (`benchmarks/README.md`).

XLA:CPU options are per program, passed to its compilation on the CPU only, because what helps
one program hurts another (interleaved runs on the AVX2 machine above):
- `train_step_compiler_options(mesh)` (`Trainer.compile_train_step`, CPU meshes):
  `xla_cpu_experimental_ynn_fusion_type=dot` (XLA 0.10's YNNPACK fuses dots only, not the
  elementwise ops around them) took the T5-small train step from 12.8 / 11.9 s to 11.4 / 9.9 s;
  no YNNPACK fusion at all was slower (11.9 / 13.6 s against 10.5 / 11.2 s).
- `cpu_jit(fn, decode_compiler_options)` (`decoding.greedy_decode` / `sample_decode` when JAX's
  default backend is the CPU): no YNNPACK fusion, so XLA's own dot emitter runs the decoder's
  small-batch matmuls ([8, 512] x [512, 1024] at 8-10 GB/s of weights against YNNPACK's 4-6;
  the [8, 512] x [512, 32128] lm_head 6.6 ms against 13.3): greedy 8 x 512 -> 64 tokens
  5.07 -> 4.47 s (user CPU 9.2 -> 7.9 s), 5 samples 8.52 -> 8.12 s (15.0 -> 13.3 s). The
  dot-only setting slows decoding (5.07 -> 5.53 s greedy).
Both are gin settings (`cpu_runtime.train_step_compiler_options.options`,
`cpu_runtime.decode_compiler_options.options`) for a CPU where another path is faster; a misspelt
option or a bad value is an InputError naming the setting, checked once per distinct set of options.

`retain_freed_memory()` sets three glibc `mallopt` parameters so that freed memory stays in the
process and is reused by the next call: one malloc arena (M_ARENA_MAX = 1), no mmap for large
blocks (M_MMAP_MAX = 0), no trimming of the heap's top (M_TRIM_THRESHOLD = -1). After the first
step the train step above runs with ~0 page faults and ~0.04 s of system time. The cost: the
process keeps its high-water mark of heap memory (not given back between calls; peak RSS was
4.5-5.4 GB against 5.6 GB with glibc's defaults, but once 9.1 GB from fragmentation of the one
arena: turn it off with `cpu_runtime.configure.retain_memory = False` where host memory is
short) and one arena serialises malloc calls (XLA makes a few thousand per step; no cost measured).

The settings must be made before JAX creates its CPU client: a thread keeps the arena it got at
its first malloc, so `configure()` changes nothing (and says so) once a JAX backend exists. It does nothing
when an accelerator may be used (`JAX_PLATFORMS` names one, or an accelerator plugin such as
libtpu is installed): host memory behaviour on TPU / GPU hosts is never changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import logging
import os
import sys

import gin

# XLA:CPU options per program (see the module docstring).
CPU_TRAIN_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}  # = XLA_FLAGS ...=dot
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusion

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _jax_backends_initialized() -> bool:
    """True once any JAX backend (the CPU client with its thread pool) exists."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge is not None and getattr(bridge, "_backends", None))


def cpu_only() -> bool:
    """Whether JAX can only run on the CPU in this process: `JAX_PLATFORMS` (or
    `jax.config.jax_platforms`) names only "cpu", or it is unset and no accelerator plugin
    (libtpu, a `jax_plugins` entry point / package such as the CUDA plugin) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
        platforms = sys.modules["jax"].config.jax_platforms or platforms
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    try:
        import jax_plugins  # namespace package of accelerator plugins (jax_cuda*_plugin, ...)
    except ImportError:
        return True
    return not list(getattr(jax_plugins, "__path__", []))


def retain_freed_memory() -> bool:
    """Sets glibc malloc to keep freed memory for reuse (see the module docstring). Returns
    False (and changes nothing) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def compiler_options_for(options: dict[str, str], devices) -> dict[str, str] | None:
    """`options` (XLA:CPU compile options) when every one of `devices` is a CPU, else None:
    TPU / GPU compilation is untouched."""
    return dict(options) if all(d.platform == "cpu" for d in devices) else None


@functools.lru_cache(maxsize=None)
def _check_options(items: tuple, setting: str) -> None:
    """Compiles a trivial program with the options once per distinct set, so that a misspelt
    option or a bad value is an InputError naming the gin setting, before any real compilation."""
    import jax

    from kard_jax.errors import InputError

    try:
        jax.jit(lambda x: x + 1).lower(0.0).compile(dict(items))
    except Exception as e:  # XLA: "No such compile option: ...", "... is not a valid bool value"
        raise InputError(f"{setting} = {dict(items)!r}: {str(e).splitlines()[0]}") from None


def _checked(options: dict, setting: str) -> tuple:
    """`options` as sorted (name, value) pairs (hashable: a cache key), after `_check_options`."""
    from kard_jax.errors import InputError

    if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, bool, int, float)) for k, v in options.items()):
        raise InputError(f"{setting} = {options!r}: expected a dict of XLA option names to strings, "
                         "numbers or booleans")
    items = tuple(sorted(options.items()))
    _check_options(items, setting)
    return items


@gin.configurable(module="cpu_runtime")
def train_step_compiler_options(mesh, options: dict = CPU_TRAIN_STEP_OPTIONS) -> dict | None:
    """`Lowered.compile` options for the train step on `mesh`: `options` on CPU meshes, None
    elsewhere. gin: `cpu_runtime.train_step_compiler_options.options` (default
    CPU_TRAIN_STEP_OPTIONS; `{}` compiles with XLA's defaults), for a CPU where another XLA path
    is faster."""
    if compiler_options_for(options, mesh.devices.flat) is None:
        return None
    return dict(_checked(options, "cpu_runtime.train_step_compiler_options.options"))


@gin.configurable(module="cpu_runtime")
def decode_compiler_options(options: dict = CPU_DECODE_OPTIONS) -> dict:
    """XLA:CPU compile options of `decoding.greedy_decode` / `sample_decode` on the CPU. gin:
    `cpu_runtime.decode_compiler_options.options` (default CPU_DECODE_OPTIONS; `{}` compiles
    with XLA's defaults). Read at each call, so a new binding takes effect at the next call."""
    return options


class cpu_jit:  # noqa: N801 (used like jax.jit)
    """`jax.jit(fn, **jit_kwargs)` that compiles with XLA:CPU `options` (a dict, or a function
    returning one, read at each call) when the devices of JAX's default backend are CPUs
    (`compiler_options_for`), and without them otherwise. Called, or `.lower(...)`d, like the
    jitted function; each distinct set of options keeps its own jitted function and cache."""

    def __init__(self, fn, options, *, setting: str = "cpu_jit options", **jit_kwargs):
        self._fn, self._jit_kwargs, self._setting = fn, jit_kwargs, setting  # setting: named in errors
        self._options = options if callable(options) else (lambda: options)
        self._variants = {}
        functools.update_wrapper(self, fn)

    def _jitted(self):
        import jax

        options = compiler_options_for(self._options(), jax.devices())
        key = None if options is None else _checked(options, self._setting)
        if key not in self._variants:
            kwargs = dict(self._jit_kwargs) if key is None else dict(self._jit_kwargs, compiler_options=dict(key))
            self._variants[key] = jax.jit(self._fn, **kwargs)
        return self._variants[key]

    def __call__(self, *args, **kwargs):
        return self._jitted()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._jitted().lower(*args, **kwargs)


@gin.configurable(module="cpu_runtime")
def configure(retain_memory: bool = True) -> bool:
    """Applies the allocator setting above when JAX will run on the CPU only; returns whether it
    was applied. Call it before anything initialises a JAX backend (`kard_jax.main` does; so do
    the benchmarks). gin: `cpu_runtime.configure.retain_memory`."""
    if not retain_memory or not cpu_only():
        return False
    if _jax_backends_initialized():
        logging.warning("cpu_runtime.configure() ran after JAX started a backend: malloc left as it "
                        "is (its threads keep the arenas they started with)")
        return False
    applied = retain_freed_memory()
    if applied:
        # debug, not info: kard_jax.main shows its own info logs on stderr, where bad input gets one line
        logging.debug("CPU only: glibc malloc keeps freed memory for reuse (one arena, no mmap, no trim)")
    return applied
