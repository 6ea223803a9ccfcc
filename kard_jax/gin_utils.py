"""Gin plumbing shared by every run mode (t5x `gin_utils`, without t5x).

Library code never imports gin: gin files use `from __gin__ import dynamic_registration` and
configure library functions by their module path. This module parses configs and writes the
operative config next to a run's outputs. Beyond plain `gin.parse_config_files_and_bindings`:

* **Includes resolve against the project's `gin_configs/` first** (then `--gin_search_paths` /
  `$KARD_GIN_SEARCH_PATH`, the CWD last), whatever the working directory holds: gin's own
  lookup tries the CWD first and then asks Python's import system, so a CWD with a `runs/` folder
  (a namespace package) broke `include 'runs/train_student.gin'`, and every miss logged an
  error-looking `E ... Path not found` line.
* **An override that the run never uses is an error** that names the closest name: a binding
  (`--gin.NAME=...` / `--gin_bindings`) must set a macro or a configurable that is reachable from
  the bound job (`kard_jax.main.execute.job`, following `@references` and `%MACROS`). Gin itself
  accepts any new macro, so `--gin.LEARNING_RATEE=3e-3` next to `LEARNING_RATE` used to run with
  the default learning rate. The configurables kard_jax calls itself on every run
  (`RUNTIME_SELECTORS`: the CPU allocator setting and XLA:CPU compile options) count as reachable.

Gin internals used (gin-config 0.5): `gin.config._CONFIG` maps (scope, selector) -> {arg: value};
a macro `NAME = v` is the binding (NAME, 'gin.macro') -> {'value': v}; a `%NAME` / `@fn` in a value
is a `ConfigurableReference` whose `config_key` is (NAME, 'gin.macro') / (scope, selector);
`_LOCATION_PREFIXES` and `_FILE_READERS` drive file lookup.
"""
from __future__ import annotations

import collections
import contextlib
import difflib
import os
import pathlib
import re
from typing import Iterator, Sequence

import gin

GIN_SEARCH_PATH_ENV = "KARD_GIN_SEARCH_PATH"
PROJECT_GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"
JOB_SELECTOR = "kard_jax.main.execute"
_MACRO = "gin.macro"
_CONSTANT = "gin.constant"
# Called by kard_jax itself (kard_jax.main before the job; the trainer and the decoders when they
# compile on the CPU), not through the job's @references: their bindings are always in use.
RUNTIME_SELECTORS = ("cpu_runtime.configure", "cpu_runtime.train_step_compiler_options",
                     "cpu_runtime.decode_compiler_options")


class UnusedBindingError(ValueError):
    """A command-line binding that sets nothing the run uses (a misspelled macro, say)."""


def default_search_paths() -> list[str]:
    """Where gin files and includes are looked up, in order: `$KARD_GIN_SEARCH_PATH` entries,
    the project's gin_configs/ (so `include 'models/t5_1_1_tiny.gin'` works from anywhere), the
    CWD last."""
    paths = [str(PROJECT_GIN_DIR), os.getcwd()]
    extra = os.environ.get(GIN_SEARCH_PATH_ENV)
    if extra:
        paths = [p for p in extra.split(os.pathsep) if p] + paths
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


def resolve_gin_file(name: str | os.PathLike, search_paths: Sequence[str]) -> str:
    """A command-line gin file: an absolute path or one that exists relative to the CWD as given,
    else the first of `search_paths` holding it (e.g. `runs/train_student.gin`). Unfound names
    are returned unchanged for gin to report."""
    name = os.fspath(name)
    if os.path.isabs(name) or os.path.isfile(name):
        return os.path.abspath(name)
    for directory in search_paths:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return name


@contextlib.contextmanager
def _gin_file_lookup(search_paths: Sequence[str]) -> Iterator[None]:
    """While parsing: gin looks includes up in `search_paths` only (absolute directories, in
    order), reading plain files only: no CWD-first lookup, no Python-package lookup (which fails
    on namespace packages and logs `E ... Path not found` for every miss)."""
    prefixes = gin.config._LOCATION_PREFIXES
    readers = gin.config._FILE_READERS
    saved_prefixes, saved_readers = list(prefixes), list(readers)
    prefixes[:] = [os.path.abspath(p) for p in search_paths]
    readers[:] = [(open, os.path.isfile)]
    try:
        yield
    finally:
        prefixes[:] = saved_prefixes
        readers[:] = saved_readers


@contextlib.contextmanager
def _recording_bindings() -> Iterator[list]:
    """Records the (scope, selector, arg) key of every `gin.bind_parameter` made by the parser."""
    keys: list = []
    original = gin.config.bind_parameter

    def recording(binding_key, value):
        original(binding_key, value)
        keys.append(gin.config.ParsedBindingKey.parse(binding_key))

    gin.config.bind_parameter = recording
    try:
        yield keys
    finally:
        gin.config.bind_parameter = original


_INCLUDE_OR_IMPORT = re.compile(r"^\s*(include|import|from)\s", re.MULTILINE)


def _references(value) -> Iterator:
    return gin.config.iterate_references(value)


def _defined_or_referenced() -> tuple[set[str], set[str]]:
    """(macro names, configurable selectors) that the parsed config defines or refers to."""
    config = gin.config._CONFIG
    macros = {scope for scope, selector in config if selector == _MACRO}
    selectors = {selector for _, selector in config if selector not in (_MACRO, _CONSTANT)}
    selectors.update(RUNTIME_SELECTORS)
    for ref in _references(config):
        name, selector = ref.config_key
        if selector == _MACRO:
            macros.add(name)
        elif selector != _CONSTANT:
            selectors.add(selector)
    return macros, selectors


def _used_by_job() -> tuple[set[str], set[str]] | None:
    """(macro names, configurable selectors) reachable from the bound job through `@references`
    and `%MACROS` (any scope); None when no job is bound (a config parsed for a library call)."""
    config = gin.config._CONFIG
    if ("", JOB_SELECTOR) not in config:
        return None
    keys_of = collections.defaultdict(list)
    for key in config:
        keys_of[key[1]].append(key)
    macros: set[str] = set()
    selectors = {JOB_SELECTOR, *RUNTIME_SELECTORS}
    todo, seen = [key for selector in selectors for key in keys_of[selector]], set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        for ref in _references(config.get(key, {})):
            name, selector = ref.config_key
            if selector == _MACRO:
                macros.add(name)
                todo.append(ref.config_key)
            elif selector != _CONSTANT and selector not in selectors:
                selectors.add(selector)
                todo.extend(keys_of[selector])
    return macros, selectors


def _users_of_macro(name: str) -> set[str]:
    """Selectors of the configurables whose bindings refer to %name (directly)."""
    return {selector for (_, selector), args in gin.config._CONFIG.items()
            if selector != _MACRO and any(ref.config_key == (name, _MACRO) for ref in _references(args))}


def _short(selector: str) -> str:
    """`kard_jax.training.trainer.train` -> `trainer.train` (how the run gins write it)."""
    return ".".join(selector.split(".")[-2:])


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def _check_used(binding: str, keys, used: tuple[set[str], set[str]], *, by_job: bool, defined: set) -> None:
    """UnusedBindingError when a key `binding` set is not in `used` (macros, selectors)."""
    macros, selectors = used
    where = "nothing reachable from kard_jax.main.execute.job uses" if by_job else "the parsed gin files never use"
    for key in keys:
        if key.complete_selector == _MACRO:
            if key.scope not in macros:
                if (key.scope, _MACRO) in defined:
                    users = sorted(_short(selector) for selector in _users_of_macro(key.scope))
                    what = f"the macro {key.scope} is defined but {where} it" + (
                        f" (it is read by {', '.join(users)}, which this run does not call)" if users else "")
                else:
                    what = f"no macro {key.scope} in this config{_closest(key.scope, macros)}"
                raise UnusedBindingError(f"gin binding `{binding.strip()}` has no effect: {what}")
        elif key.complete_selector not in selectors:
            candidates = [f"{_short(s)}.{key.arg_name}" for s in selectors]
            given = f"{key.given_selector}.{key.arg_name}"
            raise UnusedBindingError(
                f"gin binding `{binding.strip()}` has no effect: {where} {key.given_selector}"
                f"{_closest(given, candidates)}")


_UNKNOWN_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
_UNKNOWN_CONFIGURABLE = re.compile(r"No configurable matching '([^']+)'")


def _with_suggestion(e: Exception) -> Exception:
    """gin's unknown-parameter / unknown-configurable error with the closest name appended."""
    message = str(e)
    hint = ""
    if m := _UNKNOWN_PARAMETER.search(message):
        selector, arg = m.groups()
        configurable = gin.config._REGISTRY.get_match(selector)
        if configurable is not None:
            import inspect

            try:
                names = inspect.signature(configurable.wrapped).parameters
            except (TypeError, ValueError):
                names = {}
            hint = _closest(arg, names)
    elif m := _UNKNOWN_CONFIGURABLE.search(message):
        hint = _closest(m.group(1), [_short(s) for s in _defined_or_referenced()[1]])
    if not hint:
        return e
    first, _, rest = message.partition("\n")
    return ValueError(first.rstrip(".") + hint + ("\n" + rest if rest else ""))


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] | None = None) -> None:
    """Parse gin files, then bindings, then finalize. Raises gin's own error (naming file and line)
    on a bad config, and `UnusedBindingError` for a binding that sets nothing the run uses."""
    paths = list(search_paths) if search_paths is not None else default_search_paths()
    with _gin_file_lookup(paths):
        for gin_file in gin_files:
            gin.parse_config_file(resolve_gin_file(gin_file, paths))
        defined = set(gin.config._CONFIG)
        known = _defined_or_referenced()
        recorded = []
        for binding in bindings:
            with _recording_bindings() as keys:
                try:
                    gin.parse_config(binding)
                except ValueError as e:
                    raise _with_suggestion(e) from None
            if _INCLUDE_OR_IMPORT.search(binding):  # an included file may bring new names
                known = tuple(a | b for a, b in zip(known, _defined_or_referenced()))
            else:
                recorded.append((binding, keys))
        used = _used_by_job()
        for binding, keys in recorded:
            _check_used(binding, keys, used if used is not None else known, by_job=used is not None,
                       defined=defined)
    gin.finalize()


def write_operative_config(directory: str | os.PathLike, filename: str = "config.gin") -> pathlib.Path:
    """Atomically write gin's operative config (what the run actually used) to directory/filename
    (mode 0644 under umask 022)."""
    from kard_jax.knowledge import atomic

    target = pathlib.Path(directory) / filename
    atomic.write_text(target, gin.operative_config_str())
    return target
