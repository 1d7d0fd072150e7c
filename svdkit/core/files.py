"""Atomic output folders: a folder appears whole or not at all, and is never silently overwritten."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


# Every output folder svdkit writes holds this file; svdkit replaces (``overwrite``, ``--fresh``) only such folders.
MARKER = ".svdkit-output"


def mark(folder: str | os.PathLike) -> None:
    """Record that svdkit wrote ``folder`` (so a later ``overwrite`` may replace it)."""
    (Path(folder) / MARKER).write_text("written by svdkit: `--overwrite` / `overwrite=True` may replace this folder\n")


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse to replace ``path`` unless svdkit wrote it (it holds :data:`MARKER`) and it is neither the
    current directory, the home directory, a filesystem root nor an ancestor of the current directory."""
    path = Path(path)
    where = path.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    why = ("the current directory" if where == cwd else "the home directory" if where == home else
           "a filesystem root" if where == Path(where.anchor) else
           "an ancestor of the current directory" if cwd.is_relative_to(where) else None)  # fmt: skip
    if why:
        raise FileExistsError(f"refusing to replace {path}: it is {why}. Choose a new folder for the output.")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise FileExistsError(f"refusing to replace {path}: svdkit did not write it (it has no {MARKER} file), and "
                              "svdkit only replaces folders it wrote. Choose another folder, or delete it yourself.")  # fmt: skip


def remove_output(path: str | os.PathLike) -> None:
    """Delete an output folder svdkit wrote (see :func:`check_replaceable`); a missing one is fine."""
    path = Path(path)
    if path.exists():
        check_replaceable(path)
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename.

    On any error the temporary folder is removed and ``path`` is left as it was. An existing
    non-empty ``path`` is an error unless ``overwrite=True``, and even then only a folder svdkit wrote
    is replaced (:func:`check_replaceable`; the folder gets its :data:`MARKER` here).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file; choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; pass overwrite=True or choose another folder.")
    if path.exists():
        check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        mark(tmp)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (a temporary sibling, then one rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
