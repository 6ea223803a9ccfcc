"""Run modes of the tasks stage (bound in gin: `kard_jax.main.execute.job = @run.materialize`)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from kard_jax.tasks import cache


def materialize(
    *,
    task: str,
    out_dir: str,
    splits: Sequence[str] = ("train",),
    num_shards: int = 8,
    register: Sequence[Callable[[], Any]] = (),
) -> list[dict]:
    """Register tasks (`register`: functions such as a gin-configured
    `registry.register_kard_tasks`), then write `task`'s `splits` as `num_shards` TFRecord files
    each under `out_dir` (seqio cache layout). Prints one summary line per split."""
    for fn in register:
        fn()
    manifests = []
    for split in splits:
        m = cache.write_task_cache(task, split, out_dir, num_shards=num_shards)
        print(
            f"kard_jax: materialized {task}:{split}: {m['examples']} examples in {m['num_shards']} shards, "
            f"{m['seconds']:.1f}s ({m['examples_per_second']:.0f} examples/s) -> "
            f"{cache.task_cache_dir(out_dir, task)}"
        )
        manifests.append(m)
    return manifests
