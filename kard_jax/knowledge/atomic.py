"""Atomic outputs (the ONE place every stage writes results through): build into a temp file or
directory next to the target, then `os.replace` it into place.

Readers never see a half-written output, and the result has ordinary permissions: files
`0o666 & ~umask`, directories `0o777 & ~umask` (0644 / 0755 under the usual umask 022), not the
private 0600 / 0700 that `tempfile.mkstemp` / `mkdtemp` create their temp files with.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import stat
import tempfile
from typing import IO, Any, Iterator


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), since the
    set-and-restore dance of `os.umask` is racy when other threads create files meanwhile."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a plainly created file gets: 0o666 & ~umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a plainly created directory gets: 0o777 & ~umask."""
    return 0o777 & ~current_umask()


def _normalize_modes(root: pathlib.Path) -> None:
    """Give `root` and everything under it the modes of plainly created files / directories
    (executable files keep their x bits, as umask allows), undoing mkstemp's / mkdtemp's 0600 /
    0700 on temp files that end up inside an output."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                executable = st.st_mode & stat.S_IXUSR
                os.chmod(p, dmode if executable else fmode)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[pathlib.Path]:
    """Yields an empty temp dir; on success it replaces `path`, on failure it is removed.

    Readers never see a half-written `path`: either the old directory or the complete new one.
    The result and everything in it get ordinary modes (0755 / 0644 under umask 022). If moving
    the new directory into place fails, the old one is put back.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, dir_mode())
    try:
        yield tmp
        _normalize_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def replace_directory(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete directory `new` to `target`, swapping out an existing `target` (which
    is put back if the move fails, and deleted once it succeeded)."""
    new, target = pathlib.Path(new), pathlib.Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    old = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Yields a temp file object opened with `mode` ("w" or "wb") next to `path`; on success it
    is closed, given mode 0o666 & ~umask and renamed to `path`; on failure it is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode must be 'w' or 'wb', got {mode!r}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (temp file + os.replace), mode 0o666 & ~umask."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically, mode 0o666 & ~umask."""
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented, key-sorted JSON to `path` atomically, mode 0o666 & ~umask."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
