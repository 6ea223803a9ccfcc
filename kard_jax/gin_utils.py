"""Gin plumbing shared by every run mode (t5x `gin_utils`, without t5x).

Library code never imports gin: gin files use `from __gin__ import dynamic_registration` and
configure library functions by their module path. This module only parses configs and writes
the operative config next to a run's outputs.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Sequence

import gin

GIN_SEARCH_PATH_ENV = "KARD_GIN_SEARCH_PATH"


def default_search_paths() -> list[str]:
    """The repo's gin_configs/ (so `include 'models/t5_1_1_tiny.gin'` works) and the CWD."""
    paths = [os.getcwd(), str(pathlib.Path(__file__).resolve().parents[1] / "gin_configs")]
    extra = os.environ.get(GIN_SEARCH_PATH_ENV)
    if extra:
        paths = extra.split(os.pathsep) + paths
    return paths


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turn t5x-style `--gin.NAME=VALUE` into `--gin_bindings=NAME=VALUE`."""
    out = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            out.append(f"--gin_bindings={name} = {value}")
        else:
            out.append(arg)
    return out


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] | None = None) -> None:
    """Parse gin files + bindings; raises gin's own error (naming file and line) on bad config."""
    for path in search_paths if search_paths is not None else default_search_paths():
        gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=True)


def write_operative_config(directory: str | os.PathLike, filename: str = "config.gin") -> pathlib.Path:
    """Atomically write gin's operative config (what the run actually used) to directory/filename."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / filename
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.")
    with os.fdopen(fd, "w") as f:
        f.write(gin.operative_config_str())
    os.replace(tmp, target)
    return target
