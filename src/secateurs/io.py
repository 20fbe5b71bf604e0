"""Writes that never leave a half-written output: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from secateurs.errors import SecateursError


def ensure_free(path: str | Path | None, what: str) -> None:
    """Refuse an output path that already exists or cannot be written, before any work."""
    if path is None:
        return
    if Path(path).exists():
        raise SecateursError(
            f"{what} '{path}' already exists; choose another path or remove it first"
        )
    ensure_writable(path, what)


def ensure_writable(path: str | Path, what: str) -> None:
    """Refuse an output whose nearest existing ancestor is a file or a folder we cannot write."""
    ancestor = Path(path).expanduser().absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SecateursError(
            f"{what} '{path}' cannot be created: '{ancestor}' is a file, not a folder; "
            "choose a path under a folder"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SecateursError(
            f"{what} '{path}' cannot be created: the folder '{ancestor}' is not writable; "
            "choose a path you can write to"
        )


@contextlib.contextmanager
def _os_errors(target: Path) -> Iterator[None]:
    """An operating-system error while writing an output becomes a one-line error."""
    try:
        yield
    except OSError as exc:
        raise SecateursError(
            f"could not write '{target}' ({exc.strerror or exc}); check that its folder is "
            "writable and the disk has room"
        ) from exc


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` only on success."""
    target = Path(target)
    with _os_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _os_errors(target):
            tmp.chmod(0o777 & ~_umask())
            yield tmp
            if replace and target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; rename it to ``target`` on success."""
    target = Path(target)
    with _os_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
        )
    os.close(fd)
    try:
        with _os_errors(target):
            # mkstemp makes the file private (0600); an output is as readable as any new file
            os.chmod(tmp, 0o666 & ~_umask())
            yield Path(tmp)
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write ``text`` to ``target`` through a temporary file and a rename."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
