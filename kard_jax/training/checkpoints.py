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
import re
import shutil
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import orbax.checkpoint as ocp

from kard_jax.errors import InputError
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


class CheckpointMismatchError(InputError):
    """A readable checkpoint whose parameters do not fit the current model (not a corruption);
    an InputError, so `kard_jax.main` reports it in one line with exit code 2."""


class Restored(NamedTuple):
    step: int
    state: TrainState
    data_iterator: dict[str, Any] | None
    metadata: dict[str, Any] | None


def _report(message: str) -> None:
    """One line on stderr (process 0; not also through absl logging, which writes to the same
    console: the line would show twice)."""
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
        check_params_match(saved_state["params"], abstract_state.params, f"at step {step} in {self.directory}",
                           "use a new MODEL_DIR or the matching model config")

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
        return newest_readable(
            [(step, self.directory / str(step)) for step in self.all_steps()],
            lambda step, _: self.restore(step, abstract_state),
            where=self.directory, fallback="resuming from", on_unreadable=self._set_aside,
        )

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


def _scan_layout(paths) -> str | None:
    if any(re.search(r"(^|/)layers_\d+/", p) for p in paths):
        return "unscanned"
    if any(re.search(r"(^|/)layers/", p) for p in paths):
        return "scanned"
    return None


def layer_layout_hint(saved_paths, model_paths) -> str | None:
    """A fix to suggest when a checkpoint and the model differ only in layer layout: checkpoints
    store the layout they were trained with (scanned: `encoder/layers/...` stacked on a leading
    axis; unscanned: `encoder/layers_0/...`), as t5x does; HF export/import is layout-free."""
    saved, model = _scan_layout(saved_paths), _scan_layout(model_paths)
    if saved is None or model is None or saved == model:
        return None
    flag = "True" if saved == "scanned" else "False"
    return (f"the checkpoint stores {saved} layers but the model config has scan_layers="
            f"{'True' if model == 'scanned' else 'False'}: set T5Config.scan_layers={flag} (gin: "
            f"t5.preset_config.scan_layers = {flag}) to use it, or export it to Hugging Face format and "
            f"import that (HF files are the same in both layouts)")


def _shape(x) -> str:
    return "absent" if x is None else str(x)


def check_params_match(saved_params: PyTree, model_params: PyTree, where: str, fix: str) -> None:
    """CheckpointMismatchError naming the parameters (and both shapes) where a checkpoint's saved
    params (orbax metadata or arrays) differ from the model's (abstract) params."""
    saved = {path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved_params)[0]}
    want = {path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(model_params)[0]}
    if saved == want:
        return
    diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    details = ", ".join(f"{k}: checkpoint {_shape(saved.get(k))} vs model {_shape(want.get(k))}" for k in diff[:5])
    raise CheckpointMismatchError(
        f"checkpoint {where} does not match the model ({len(diff)} parameter(s) differ: {details}); "
        f"{layer_layout_hint(saved, want) or lexical_weight_hint(diff, saved) or fix}"
    )


# The parameters only a hybrid reranker has (`reranker.RerankerModel.lexical_weight`).
HYBRID_RERANKER_PARAMS = ("lexical_weight", "neural_weight")


def lexical_weight_hint(diff: Sequence[str], saved: Mapping[str, Any]) -> str | None:
    """The fix when the only difference is the hybrid reranker's own parameters
    (`reranker.RerankerModel.lexical_weight`)."""
    if not diff or not set(diff) <= set(HYBRID_RERANKER_PARAMS) or "lexical_weight" not in diff:
        return None
    if "lexical_weight" in saved:
        return ("the checkpoint is a hybrid reranker (trained with LEXICAL_WEIGHT): set LEXICAL_WEIGHT / "
                "RERANKER_LEXICAL_WEIGHT to a number (its trained weight is restored)")
    return "the checkpoint is a reranker without the lexical feature: set LEXICAL_WEIGHT / RERANKER_LEXICAL_WEIGHT = None"


def newest_readable(
    steps: Sequence[tuple[int, pathlib.Path]],
    restore: Callable[[int, pathlib.Path], Any],
    *,
    where: str | os.PathLike,
    fallback: str,
    on_unreadable: Callable[[int], None] | None = None,
) -> Any:
    """`restore(step, step_dir)` of the newest of `steps` (ascending (step, dir) pairs) that reads.

    A step that fails to read (truncated or missing files: orbax/tensorstore raise many types) is
    reported on stderr ("...; {fallback} step N instead") and, with `on_unreadable`, handed to it;
    the next older step is tried. A CheckpointMismatchError (the model does not fit) is raised at
    once: older steps of the same run would not fit either. Returns None when none reads.
    Training resume and export / evaluation share this.
    """
    for i, (step, step_dir) in enumerate(reversed(steps)):
        try:
            return restore(step, step_dir)
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - see docstring
            previous = steps[-i - 2][0] if i + 1 < len(steps) else None
            then = f"{fallback} step {previous} instead" if previous is not None else "no earlier checkpoint"
            _report(
                f"checkpoint at step {step} in {where} is unreadable "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); {then}"
            )
            if on_unreadable is not None:
                on_unreadable(step)
    return None


def checkpoint_step_dirs(path: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """(step, absolute step directory) pairs, ascending, from a MODEL_DIR, its `checkpoints/`
    directory or one step directory (a single pair, step -1 when its name is not a number).
    InputError naming the path when there is none. Absolute: orbax refuses relative paths."""
    path = pathlib.Path(path).absolute()
    if (path / "state").is_dir():
        return [(int(path.name) if path.name.isdigit() else -1, path)]
    for base in (path / CHECKPOINTS_SUBDIR, path):
        if base.is_dir():
            steps = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "state").is_dir())
            if steps:
                return [(step, base / str(step)) for step in steps]
    what = "does not exist" if not path.exists() else "holds no checkpoint"
    raise InputError(
        f"{what} (expected a training MODEL_DIR with {CHECKPOINTS_SUBDIR}/<step>/state, its "
        f"{CHECKPOINTS_SUBDIR}/ directory or one step directory)", path=path,
    )


def find_checkpoint_step_dir(path: str | os.PathLike) -> pathlib.Path:
    """The newest step directory (absolute) from a MODEL_DIR, its `checkpoints/` directory or a
    step directory itself."""
    return checkpoint_step_dirs(path)[-1][1]


def _restore_params_step(step_dir: pathlib.Path, abstract_params: PyTree) -> PyTree:
    # The item handler itself, not a Checkpointer: `state/` is one item of a composite step, and a
    # Checkpointer on it logs a warning that the step metadata file is missing.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = handler.metadata(step_dir / "state")
        saved = getattr(saved, "item_metadata", saved)  # orbax versions differ in the wrapper
        if saved is None or "params" not in saved:
            raise FileNotFoundError(f"no readable params metadata in {step_dir / 'state'}")
        check_params_match(
            saved["params"], abstract_params, str(step_dir),
            "use the model gin the checkpoint was trained with (its MODEL_DIR/config.gin records it)",
        )
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
        restored = handler.restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True
            ),
        )
    finally:
        handler.close()
    return restored["params"]


def restore_params(path: str | os.PathLike, abstract_params: PyTree) -> PyTree:
    """Only the params of the checkpoint at `path` (a MODEL_DIR, its checkpoints/ directory or a
    step directory; relative paths are fine), restored into `abstract_params` (ShapeDtypeStructs
    with shardings); optimizer state is ignored.

    The newest step that reads is used: unreadable newer steps are reported and skipped (left in
    place: this is a reader), as training resume does. A model whose parameters differ from the
    checkpoint's is a CheckpointMismatchError naming the parameters and both shapes.
    """
    steps = checkpoint_step_dirs(path)
    params = newest_readable(steps, lambda _, step_dir: _restore_params_step(step_dir, abstract_params),
                             where=pathlib.Path(path).absolute(), fallback="using")
    if params is None:
        raise InputError(f"no readable checkpoint (tried step(s) {', '.join(str(s) for s, _ in steps)}; "
                         "see the lines above)", path=pathlib.Path(path).absolute())
    return params


InitialCheckpoint = str | os.PathLike | Callable[[], PyTree] | None
