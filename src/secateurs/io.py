"""Files: writes that never leave a half-written output (write beside the target, then rename),
with the modes the umask gives, and checks that an input file is whole before it is read."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from secateurs.errors import SecateursError

# The signals that stop a run by unwinding it (the command line turns SIGTERM and SIGHUP into
# an exception as Python does SIGINT); held while a temporary is made, see _signals_held.
_STOPPING = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


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


def _write_failure(exc: BaseException) -> str | None:
    """Why a write failed, if the machine failed it (no room, no permission), else None.

    safetensors reports its own I/O errors as SafetensorError, not OSError, and only its
    writes fail "while serializing"; a damaged file it reads is the caller's to name.
    """
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    if isinstance(exc, SafetensorError) and "while serializing" in str(exc):
        return str(exc).split(": ", 1)[-1]
    return None


@contextlib.contextmanager
def _os_errors(target: Path) -> Iterator[None]:
    """An operating-system error while writing an output becomes a one-line error."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
        raise SecateursError(
            f"could not write '{target}' ({reason}); check that its folder is writable and the "
            "disk has room"
        ) from exc


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Stopping signals wait while a temporary is made or removed: the exception a signal
    raises must come after the temporary's name is known (so that the caller's cleanup can
    remove it) and must not cut its removal short."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _umask() -> int:
    """The process's file-creation mask.

    Linux shows it in /proc; elsewhere reading it means setting it (so it is set back), which
    another thread creating a file at that moment would see.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_umask_modes(path: Path) -> None:
    """``path`` (a file, or a folder and all it holds) gets the modes a new file or folder
    gets under the umask: writers differ (mkstemp and safetensors make files 0600), and an
    output's readers should not depend on which writer made it. Links are left alone, so that
    nothing outside the output changes."""
    mask = _umask()
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    for root, folders, files in os.walk(path):
        for name in folders + files:
            inner = Path(root, name)
            if not inner.is_symlink():
                inner.chmod((0o777 if name in folders else 0o666) & ~mask)


def _publish(tmp: Path, target: Path) -> None:
    """Give a finished temporary its modes and rename it to ``target``: the one moment an
    output appears (tests stop a run here)."""
    _give_umask_modes(tmp)
    os.replace(tmp, target)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors; the ones created, innermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove(tmp: Path | None, parents: list[Path]) -> None:
    """Remove a temporary and the folders made for it that are still empty."""
    with _signals_held():
        if tmp is not None and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        for folder in parents:
            with contextlib.suppress(OSError):  # not empty: something else lives there now
                folder.rmdir()


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` only on success.

    On any failure or interruption (any BaseException) the temporary is removed, and so are
    the parent folders made for it.
    """
    target = Path(target)
    tmp: Path | None = None
    parents: list[Path] = []
    published = False
    try:
        with _os_errors(target):
            with _signals_held():
                parents = _make_parents(target.parent)
                tmp = Path(
                    tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
                )
            yield tmp
            if replace and target.exists():
                shutil.rmtree(target)
            _publish(tmp, target)
            published = True
    finally:
        if not published:
            _remove(tmp, parents)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; rename it to ``target`` on success.

    The writer may replace the temporary (safetensors writes its own and renames it over);
    the mode is given at publication, so it is the umask's whichever way the file was made.
    """
    target = Path(target)
    tmp: Path | None = None
    parents: list[Path] = []
    published = False
    try:
        with _os_errors(target):
            with _signals_held():
                parents = _make_parents(target.parent)
                fd, name = tempfile.mkstemp(
                    prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
                )
                os.close(fd)
                tmp = Path(name)
            yield tmp
            _publish(tmp, target)
            published = True
    finally:
        if not published:
            _remove(tmp, parents)


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write ``text`` to ``target`` through a temporary file and a rename."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _corrupt(path: Path, why: str) -> SecateursError:
    return SecateursError(
        f"'{path}' is truncated or corrupt ({why}); replace it with a whole copy (download or "
        "save it again)"
    )


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file that is cut short or whose header does not parse, naming it
    (safetensors' own errors name no file). Reads the header only: 8 bytes of length, JSON."""
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if size < 8 or 8 + length > size:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(file.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise _corrupt(path, f"its header cannot be read: {exc}") from exc
    expected = 8 + length + max(ends, default=0)
    if expected != size:  # safetensors itself refuses a file its header does not cover exactly
        raise _corrupt(path, f"{size:,} bytes where its header describes {expected:,}")


def check_json(path: Path) -> None:
    """Refuse a JSON file that does not parse, naming it."""
    try:
        json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _corrupt(path, f"not valid JSON: {exc}") from exc


def check_folder_files(folder: str | Path) -> None:
    """Refuse a local model folder holding a damaged safetensors or JSON file, naming the file,
    before a loader reads it and fails with an error that names none. Anything that is not a
    folder (a hub id, a built-in name) is left to the loaders."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors" and path.is_file():
            check_safetensors(path)
        elif path.suffix == ".json" and path.is_file():
            check_json(path)
