r"""Entry point for every kard_jax run mode (t5x `main.py` style).

    python -m kard_jax.main --gin_file=gin_configs/runs/train_student.gin \
        --gin.MODEL_DIR="'/tmp/run'" [--gin.TRAIN_STEPS=100] [--dry_run]

A run gin binds `kard_jax.main.execute.job = @some.module.function`; every argument of that
function comes from gin. `--dry_run` parses the config, prints the bindings and exits without
any device work, so a typo in a gin file fails in seconds, not after a TPU pod has started.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any, Callable, Sequence

from absl import app, flags, logging

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined on first run, not at import: gin files `import kard_jax.main` for `execute`."""
    if "gin_file" in FLAGS:
        return
    flags.DEFINE_multi_string("gin_file", [], "Gin files to parse, in order.")
    flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings (also --gin.NAME=VALUE).")
    flags.DEFINE_list("gin_search_paths", None, "Extra directories to look up gin includes in.")
    flags.DEFINE_bool("dry_run", False, "Parse the gin config, print it and exit.")
    flags.DEFINE_bool(
        "multihost", False, "Call jax.distributed.initialize() first (TPU pod slices; one process per host)."
    )
    flags.DEFINE_integer(
        "plan_devices", None, "--dry_run of a trainer.train job: plan the memory for a mesh of this many devices "
        "(an abstract mesh, e.g. 16 for a v4-32); default: the devices jax sees here."
    )
    flags.DEFINE_float("plan_hbm_gib", None, "--dry_run: refuse the plan when a device's share of the state exceeds this.")


def execute(job: Callable[[], Any]) -> Any:
    """Runs the run mode bound in gin as `kard_jax.main.execute.job = @module.function`."""
    return job()


def _print_launch_plan() -> None:
    """--dry_run of a `trainer.train` job: the per-device memory plan from the real shardings.

    The bound `model`, `optimizer`, `mesh_config`, `logical_axis_rules` and `microbatches` are
    evaluated the way gin evaluates them for the call (deepcopy of the bound references); the
    training data is not touched. No device memory is used (kard_jax.training.launch_plan).
    """
    import copy
    import inspect

    import gin

    trainer = sys.modules.get("kard_jax.training.trainer")  # imported by the gin files of training jobs
    if trainer is None:
        return
    try:
        job = copy.deepcopy(gin.query_parameter("kard_jax.main.execute.job"))
    except ValueError:
        return
    if getattr(job, "__wrapped__", None) is not trainer.train:  # the gin wrapper of trainer.train
        return
    from kard_jax.training import launch_plan

    defaults = inspect.signature(trainer.train).parameters

    def bound(name: str) -> Any:
        try:
            return copy.deepcopy(gin.query_parameter(f"kard_jax.training.trainer.train.{name}"))
        except ValueError:
            return defaults[name].default

    plan = launch_plan.plan_launch(
        bound("model"), bound("optimizer"), bound("mesh_config"), bound("logical_axis_rules"),
        num_devices=FLAGS.plan_devices, microbatches=bound("microbatches"),
        device_memory_bytes=None if FLAGS.plan_hbm_gib is None else int(FLAGS.plan_hbm_gib * 2**30),
    )
    print("\n".join(plan.lines()))


class _OwnInfoOnly:
    """absl log filter: every record at WARNING and above, INFO and below only from kard_jax."""

    package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def filter(self, record) -> bool:
        return record.levelno >= 30 or record.pathname.startswith(self.package_dir)  # 30: logging.WARNING


def _hide_library_info_logs() -> None:
    """Console logs: kard_jax's own INFO lines and every library's WARNING and above; the INFO
    chatter of orbax, jax, gin, ... (dozens of lines per stage) only with an explicit
    --verbosity (e.g. --verbosity=0), so a stage's output and its one-line errors stand out."""
    handler = logging.get_absl_handler()
    if FLAGS["verbosity"].present or any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        return
    handler.addFilter(_OwnInfoOnly())


def one_line(error: BaseException) -> str:
    """An error as ONE line: gin's call-trace lines ("In call to configurable ...") dropped, its
    location lines ("In file ..., line N" + the line's text) folded into the message."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith("In call to configurable")]
    if not lines:
        return type(error).__name__
    return lines[0] + (f" ({'; '.join(lines[1:])})" if len(lines) > 1 else "")


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    _hide_library_info_logs()
    import gin

    from kard_jax import cpu_runtime, gin_utils  # registered before gin locks the config

    if not FLAGS.gin_file:
        raise app.UsageError("--gin_file is required (see gin_configs/runs/).")
    search = list(FLAGS.gin_search_paths or []) + gin_utils.default_search_paths()
    try:
        gin_utils.parse(FLAGS.gin_file, FLAGS.gin_bindings, search_paths=search)
    except Exception as e:  # gin's message names the file, the line and the binding
        message = one_line(e)
        if required := re.search(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", message):
            message += f" (set it with --gin.{required.group(1)}=...)"
        print(f"kard_jax: invalid gin config: {message}", file=sys.stderr)
        return 2
    if FLAGS.dry_run:
        print(gin.config_str())
        from kard_jax.errors import InputError

        try:
            _print_launch_plan()
        except InputError as e:  # a mesh that cannot shard a dimension, a state that cannot fit
            print(f"kard_jax: error: {one_line(e)}", file=sys.stderr)
            return 2
        print("kard_jax: dry run OK, config parsed; nothing was run.")
        return 0
    # Before anything starts a JAX backend (its threads keep the malloc arena they start with).
    gin.get_configurable(cpu_runtime.configure)()
    if FLAGS.multihost:
        import jax

        jax.distributed.initialize()
    from kard_jax.errors import InputError

    try:
        gin.get_configurable(execute)()
    except InputError as e:  # bad user input: one line naming file, line and field; no traceback
        print(f"kard_jax: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


class _Terminated(BaseException):
    """SIGTERM outside the training loop. A BaseException, so `except Exception` handlers on the
    way (e.g. the checkpoint restore that sets unreadable checkpoints aside) do not catch it."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # one clean unwind; a repeated SIGTERM does not cut it short
    raise _Terminated()


def _main_stopping_on_sigterm(argv: Sequence[str]) -> int:
    """`main`, where a SIGTERM at any point after start-up ends in a clean exit (code 0).

    The trainer replaces this handler while its loop runs (it checkpoints at the next step and
    returns) and restores it afterwards. With --multihost, jax.distributed.initialize() installs
    JAX's preemption notifier for SIGTERM, which the trainer's preemption sync point reads.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return main(argv)
    except _Terminated:
        message = ("received SIGTERM outside the training loop; stopped cleanly (no checkpoint was written now; "
                   "a rerun resumes from the newest checkpoint in MODEL_DIR)")
        logging.warning(message)
        print(f"kard_jax: {message}", file=sys.stderr, flush=True)
        return 0


def run() -> None:
    """Console-script entry (`kard_jax ...`)."""
    from kard_jax import gin_utils

    _define_flags()
    sys.argv = gin_utils.rewrite_gin_args(sys.argv)
    app.run(lambda argv: sys.exit(_main_stopping_on_sigterm(argv)))


if __name__ == "__main__":
    # Run through the importable module so gin's `import kard_jax.main` sees the same `execute`.
    from kard_jax import main as _main

    _main.run()
