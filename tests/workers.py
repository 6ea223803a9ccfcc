"""Shared by the multi-process tests: wait for worker processes and report each one's failure."""
from __future__ import annotations

import subprocess
from typing import Callable, Sequence


def wait_for_workers(procs: Sequence[subprocess.Popen], while_running: Callable[[], None] | None = None,
                     timeout: float = 600) -> None:
    """Runs `while_running` (e.g. a one-process reference), waits for every worker, kills the
    rest on failure, and asserts each exited 0 after printing 'WORKER <i> DONE'."""
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
    for pid, (code, out, err) in enumerate(results):
        assert code == 0 and f"WORKER {pid} DONE" in out, f"process {pid} exited {code}:\n{err[-4000:]}"
