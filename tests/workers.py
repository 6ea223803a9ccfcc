"""Shared by the multi-process tests: wait for worker processes and report each one's failure."""
from __future__ import annotations

import subprocess
from typing import Callable, Sequence


def communicate_all(procs: Sequence[subprocess.Popen], while_running: Callable[[], None] | None = None,
                    timeout: float = 600) -> list[tuple[int, str, str]]:
    """Runs `while_running` (e.g. a one-process reference), then waits for every worker and returns
    each one's (exit code, stdout, stderr); on any failure (or timeout) kills the workers still running."""
    results = []
    try:
        if while_running is not None:
            while_running()
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def wait_for_workers(procs: Sequence[subprocess.Popen], while_running: Callable[[], None] | None = None,
                     timeout: float = 600) -> None:
    """`communicate_all`, then asserts each worker exited 0 after printing 'WORKER <i> DONE'."""
    for pid, (code, out, err) in enumerate(communicate_all(procs, while_running, timeout)):
        assert code == 0 and f"WORKER {pid} DONE" in out, f"process {pid} exited {code}:\n{err[-4000:]}"
