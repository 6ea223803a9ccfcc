r"""Entry point for every kard_jax run mode (t5x `main.py` style).

    python -m kard_jax.main --gin_file=gin_configs/runs/train_student.gin \
        --gin.MODEL_DIR="'/tmp/run'" [--gin.TRAIN_STEPS=100] [--dry_run]

A run gin binds `kard_jax.main.execute.job = @some.module.function`; every argument of that
function comes from gin. `--dry_run` parses the config, prints the bindings and exits without
any device work, so a typo in a gin file fails in seconds, not after a TPU pod has started.
"""
from __future__ import annotations

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


def execute(job: Callable[[], Any]) -> Any:
    """Runs the run mode bound in gin as `kard_jax.main.execute.job = @module.function`."""
    return job()


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    import gin

    from kard_jax import gin_utils

    if not FLAGS.gin_file:
        raise app.UsageError("--gin_file is required (see gin_configs/runs/).")
    search = list(FLAGS.gin_search_paths or []) + gin_utils.default_search_paths()
    try:
        gin_utils.parse(FLAGS.gin_file, FLAGS.gin_bindings, search_paths=search)
    except Exception as e:  # gin's message names the file, the line and the binding
        logging.error("Invalid gin config: %s", e)
        print(f"kard_jax: invalid gin config: {e}", file=sys.stderr)
        return 2
    if FLAGS.dry_run:
        print(gin.config_str())
        print("kard_jax: dry run OK, config parsed; nothing was run.")
        return 0
    if FLAGS.multihost:
        import jax

        jax.distributed.initialize()
    from kard_jax.errors import InputError

    try:
        gin.get_configurable(execute)()
    except InputError as e:  # bad user input: one line naming file, line and field; no traceback
        logging.error("%s", e)
        print(f"kard_jax: error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console-script entry (`kard_jax ...`)."""
    from kard_jax import gin_utils

    _define_flags()
    sys.argv = gin_utils.rewrite_gin_args(sys.argv)
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    # Run through the importable module so gin's `import kard_jax.main` sees the same `execute`.
    from kard_jax import main as _main

    _main.run()
