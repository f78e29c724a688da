"""Crash-safe writes: everything a run leaves on disk is written to a temporary name, then renamed.

A reader therefore sees either the old complete file/directory or the new complete one, never a
half-written one; leftovers of a crash carry a `.tmp-` name and are ignored (and cleaned up).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import SoupError

TMP_MARK = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_MARK}{path.name}.{uuid.uuid4().hex[:8]}")
    # created with its final mode, so a private file is never readable by others, not even briefly
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_write_private(path: str | Path, text: str) -> None:
    """A file only its owner can read (mode 0600): API keys, server arguments."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=0o600)


class RunDirError(SoupError, PermissionError):
    """A run directory this user must not use: someone else's, or open to others."""


def make_private_dir(path: str | Path) -> Path:
    """Create `path` (mode 0700) or check an existing one: it must be ours and not open to others."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise RunDirError(f"{path} belongs to user id {st.st_uid}, not to you ({os.getuid()}); "
                              "a run only uses directories of its own user")
    if st.st_mode & 0o022:
        raise RunDirError(f"{path} is writable by other users (mode {oct(st.st_mode & 0o777)}); "
                              f"fix it with `chmod go-w {path}` (or 700) before running")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours and not writable by others: just close it
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_MARK}{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb+") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f"{TMP_MARK}old-{path.name}.{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tmp_leftovers(folder: str | Path) -> None:
    """Delete what a crash left half-written in `folder` (only names carrying the temporary mark)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name.startswith(TMP_MARK):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
