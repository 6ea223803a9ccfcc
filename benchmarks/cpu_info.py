"""One line describing the CPU a benchmark ran on, printed next to every speed ratio.

CPU speed ratios depend on the vector ISA each side's kernels can use (oneDNN in PyTorch and
XLA:CPU pick AVX2, AVX-512 or AMX code paths) and on the threads each side runs, so a ratio is
only comparable with the machine line next to it.

    python benchmarks/cpu_info.py
"""
import os
import platform
import sys

# /proc/cpuinfo flag -> the name printed, in print order.
ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512F",
    "avx512_bf16": "AVX-512-BF16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}
THREAD_ENV_VARS = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str] | None]:
    """(model name, flags) of the first processor in /proc/cpuinfo; (None, None) without it."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None, None
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:  # x86 / arm
            flags = set(value.split())
    return model, flags


def isa(flags: set[str] | None) -> str:
    """The ISA extensions among ISA_FLAGS that `flags` lists ("none" / "unknown")."""
    if flags is None:
        return "unknown"
    found = [name for flag, name in ISA_FLAGS.items() if flag in flags]
    return " ".join(found) if found else "none of AVX2/AVX-512F/AVX-512-BF16/AMX"


def threads() -> str:
    """The thread settings in effect: torch's (when torch is loaded) and the env vars set."""
    parts = []
    torch = sys.modules.get("torch")
    if torch is not None:
        parts.append(f"torch intra-op {torch.get_num_threads()} inter-op {torch.get_num_interop_threads()}")
    for name in THREAD_ENV_VARS:
        if os.environ.get(name):
            parts.append(f"{name}={os.environ[name]!r}")
    return ", ".join(parts) if parts else "defaults (no thread env vars, torch not loaded)"


def describe(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """'cpu: MODEL | isa: AVX2 AVX-512F ... | cores: N (affinity M) | threads: ...'."""
    model, flags = _cpuinfo(cpuinfo_path)
    model = model or platform.processor() or platform.machine() or "unknown"
    try:
        affinity = str(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        affinity = "unknown"
    return f"cpu: {model} | isa: {isa(flags)} | cores: {os.cpu_count()} (affinity {affinity}) | threads: {threads()}"


def fp32_peak_gflops(cpuinfo_path: str = "/proc/cpuinfo") -> float | None:
    """A nominal fp32 peak of the cores this process may use: cores x base MHz x FLOPs per cycle
    (2 FMA units x 16 lanes x 2 with AVX-512F, 2 x 8 x 2 with AVX2, 2 x 4 x 2 otherwise), the
    figure "share of peak" is quoted against. None when /proc/cpuinfo has no MHz. Turbo and AVX-512
    down-clocking move the real peak either way; treat the share as approximate."""
    _, flags = _cpuinfo(cpuinfo_path)
    try:
        with open(cpuinfo_path) as f:
            mhz = next(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    per_cycle = 64 if flags and "avx512f" in flags else 32 if flags and "avx2" in flags else 16
    return cores * mhz * 1e-3 * per_cycle


if __name__ == "__main__":
    print(describe())
    peak = fp32_peak_gflops()
    print(f"nominal fp32 peak: {peak:.0f} GFLOP/s" if peak else "nominal fp32 peak: unknown")
