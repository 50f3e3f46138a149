"""Files that survive crashes and hostile input: atomic writes, staged folders, locks, data-only pickles.

Every results file, marker and output folder of the project is written through this module, so a crash
leaves either the old file or the new one, never a truncated one; and every file the project reads from
someone else is parsed as data only. Temporary files get the mode the user's umask gives a new file
(`tempfile` would leave them private, and a rename keeps that mode).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UnsafeFileError(ValueError):
    """A file is unreadable, malformed or would run code when loaded; the message names it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(target: Path) -> Path:
    """A new empty file in `target`'s folder with the mode a plain new file would have."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` to write to; it replaces `target` only if the block succeeds."""
    target = Path(target)
    tmp = _temp_beside(target)
    try:
        yield tmp
        # Again: some writers (safetensors' save_file) replace the file, and their new one is private.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    """Write `data` to `target` atomically (flushed to disk before the rename)."""
    with atomic_path(target) as tmp, tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `target` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | Path, obj: Any, indent: int | None = 1) -> None:
    """Write `obj` as JSON (with a final newline) to `target` atomically."""
    atomic_write_text(target, json.dumps(obj, indent=indent) + "\n")


def read_json_file(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is an UnsafeFileError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UnsafeFileError(f"{what} '{path}' cannot be read ({err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UnsafeFileError(
            f"{what} '{path}' is not valid JSON ({err}); it may be truncated by a crash: "
            "delete it (or restore it) and run again"
        ) from err


@contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `target`; on success it replaces `target` in one rename.

    Readers therefore see either no folder, the previous one or the finished new one, never a mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    os.chmod(stage, 0o777 & ~_umask())
    try:
        yield stage
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "previous")
            os.replace(stage, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names the lock file and the process."""

    def __init__(self, message: str, owner: int | None = None) -> None:
        super().__init__(message)
        self.owner = owner


@contextmanager
def file_lock(lock: str | Path, what: str) -> Iterator[None]:
    """Hold `lock` (a file holding our pid) for the block; a lock left by a dead process is taken over."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
            break
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and owner != os.getpid() and _running(owner):
                raise LockedError(
                    f"another process ({owner}) is working on {what}; wait for it to end "
                    f"(if no such process is running, delete '{lock}')",
                    owner,
                ) from None
            lock.unlink(missing_ok=True)
    else:
        raise LockedError(f"cannot create the lock file '{lock}'")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, strings and numbers only: any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and only plain data is loaded")


def load_data_pickle(path: str | Path, what: str = "pickle file") -> Any:
    """Unpickle plain containers and scalars only (what heareval's label files hold), never code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UnsafeFileError(f"{what} '{path}' cannot be read ({err})") from err
    try:
        return _DataOnlyUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UnsafeFileError(f"{what} '{path}' is not loaded: {err}") from err
