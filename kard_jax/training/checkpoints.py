"""Orbax checkpoints of the train state, the data-iterator position and run metadata.

Layout: `MODEL_DIR/checkpoints/<step>/{state,data_iterator,metadata}` (orbax writes each step to
a temporary directory and renames it when complete, so a killed save leaves no step behind).
Restores target the *current* shardings, so a run resumes on a different mesh shape. A latest
checkpoint that fails to restore (truncated or missing files) is reported, moved to
`MODEL_DIR/corrupt_checkpoints/` and the previous one is used.
"""
from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from kard_jax.training.partitioning import path_str
from kard_jax.training.train_state import TrainState

PyTree = Any

CHECKPOINTS_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt_checkpoints"
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "gin-config", "numpy")


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose parameters do not fit the current model (not a corruption)."""


class Restored(NamedTuple):
    step: int
    state: TrainState
    data_iterator: dict[str, Any] | None
    metadata: dict[str, Any] | None


def _report(message: str) -> None:
    logging.warning(message)
    if jax.process_index() == 0:
        print(f"kard_jax: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """Saves (async) and restores checkpoints under `model_dir/checkpoints`, keeping the newest `keep`."""

    def __init__(self, model_dir: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True):
        self.model_dir = pathlib.Path(model_dir).absolute()
        self.directory = self.model_dir / CHECKPOINTS_SUBDIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data_iterator": ocp.JsonCheckpointHandler(),
                           "metadata": ocp.JsonCheckpointHandler()},
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, data_iterator: dict[str, Any] | None, metadata: dict[str, Any]) -> None:
        """Starts saving `step` (returns before the write finishes when async)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data_iterator=ocp.args.JsonSave(data_iterator or {}),
                metadata=ocp.args.JsonSave(metadata),
            ),
            force=True,
        )

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def check_compatible(self, step: int, abstract_state: TrainState) -> None:
        """Raise CheckpointMismatchError if the saved params' names or shapes differ from the model's.

        Raises other errors when the checkpoint's metadata is unreadable.
        """
        saved_state = self._manager.item_metadata(step)["state"]
        if saved_state is None:
            raise FileNotFoundError(f"no readable state metadata in {self.directory / str(step)}")
        saved = {path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved_state["params"])[0]}
        want = {path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}
        if saved != want:
            diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
            details = ", ".join(f"{k}: checkpoint {saved.get(k)} vs model {want.get(k)}" for k in diff[:5])
            raise CheckpointMismatchError(
                f"checkpoint at step {step} in {self.directory} does not match the model ({len(diff)} parameter(s) "
                f"differ: {details}); use a new MODEL_DIR or the matching model config"
            )

    def restore(self, step: int, abstract_state: TrainState) -> Restored:
        """Restore `step` into `abstract_state` (ShapeDtypeStructs carrying target shardings)."""
        self.check_compatible(step, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data_iterator=ocp.args.JsonRestore(),
                metadata=ocp.args.JsonRestore(),
            ),
        )
        return Restored(step, restored["state"], restored["data_iterator"] or None, restored["metadata"])

    def restore_latest(self, abstract_state: TrainState) -> Restored | None:
        """The newest checkpoint that restores; unreadable newer ones are reported and set aside."""
        steps = self.all_steps()
        for i, step in enumerate(reversed(steps)):
            try:
                return self.restore(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # orbax/tensorstore raise many types for truncated or missing files
                previous = steps[-i - 2] if i + 1 < len(steps) else None
                fallback = f"resuming from step {previous} instead" if previous is not None else "no earlier checkpoint"
                _report(
                    f"checkpoint at step {step} in {self.directory} is unreadable "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); {fallback}"
                )
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        """Move a broken step out of orbax's view so the step can be written again later."""
        if jax.process_index() == 0:
            target = self.model_dir / CORRUPT_SUBDIR / f"{step}.{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.directory / str(step)
            if source.exists():
                shutil.move(str(source), str(target))
                _report(f"moved the unreadable checkpoint to {target}")
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"kard_jax_set_aside_{step}")
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True on every host once the TPU runtime announced a preemption (multi-host pods)."""
        return self._manager.reached_preemption(step)


def find_checkpoint_step_dir(path: str | os.PathLike) -> pathlib.Path:
    """A step directory from a MODEL_DIR, its `checkpoints/` directory or a step directory itself."""
    path = pathlib.Path(path)
    if (path / "state").is_dir():
        return path
    for base in (path / CHECKPOINTS_SUBDIR, path):
        steps = [int(p.name) for p in base.glob("*") if p.name.isdigit() and (p / "state").is_dir()] if base.is_dir() else []
        if steps:
            return base / str(max(steps))
    raise FileNotFoundError(f"no checkpoint found at {path} (expected a step directory containing 'state/')")


def restore_params(path: str | os.PathLike, abstract_params: PyTree) -> PyTree:
    """Only the params of the checkpoint at `path` (any of `find_checkpoint_step_dir`'s forms),
    restored into `abstract_params` (ShapeDtypeStructs with shardings); optimizer state is ignored."""
    step_dir = find_checkpoint_step_dir(path)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True
            ),
        )
    return restored["params"]


InitialCheckpoint = str | os.PathLike | Callable[[], PyTree] | None
