"""The pool H of historical checkpoints (spec step 4), on disk with a manifest.

Layout: `root/manifest.json` and one HF checkpoint directory per version, `root/v000010/`.
- `add` writes a checkpoint under a temporary name and renames it into place, then records it in
  the manifest (also written atomically), so a crash never leaves a half-written member.
- The pool keeps the newest `keep` versions. A version that leaves the pool is *retired*; it is
  deleted only when nothing pins it: a cached prefix, a generation in flight, or the trainer
  checkpoint a run would resume from each hold a pin (`pin(owner, versions)`).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Callable, Iterable

from ..errors import SoupError
from ..io import atomic_dir, atomic_write_json, read_json, remove_tmp_leftovers


class HistoryError(SoupError, RuntimeError):
    pass


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        remove_tmp_leftovers(self.root)
        self._lock = threading.Lock()
        self._pins: dict[str, frozenset[int]] = {}
        manifest = self.root / "manifest.json"
        state = read_json(manifest) if manifest.is_file() else {"members": [], "retired": []}
        self._members: list[int] = list(state["members"])
        self._retired: list[int] = list(state["retired"])
        for v in self._members + self._retired:
            if not self.path(v).is_dir():
                raise HistoryError(f"{manifest}: lists version {v} but {self.path(v)} is missing")

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def members(self) -> list[int]:
        """The pool, oldest first."""
        with self._lock:
            return list(self._members)

    def on_disk(self) -> list[int]:
        with self._lock:
            return sorted(self._members + self._retired)

    def _write_manifest(self) -> None:
        atomic_write_json(self.root / "manifest.json", {"members": self._members, "retired": self._retired})

    def add(self, version: int, write: Callable[[Path], None]) -> Path:
        """Save `version` with `write(tmp_dir)`, make it the newest member, retire the oldest beyond `keep`."""
        with self._lock:
            if self._members and version <= self._members[-1]:
                raise HistoryError(f"version {version} is not newer than the newest member {self._members[-1]}")
        with atomic_dir(self.path(version)) as tmp:
            write(tmp)
        with self._lock:
            self._members.append(version)
            while len(self._members) > self.keep:
                self._retired.append(self._members.pop(0))
            self._write_manifest()
        self.collect()
        return self.path(version)

    def pin(self, owner: str, versions: Iterable[int]) -> None:
        versions = frozenset(versions)
        with self._lock:
            missing = versions - set(self._members) - set(self._retired)
            if missing:
                raise HistoryError(f"cannot pin versions {sorted(missing)}: not in the store {self.root}")
            self._pins[owner] = versions

    def unpin(self, owner: str) -> None:
        with self._lock:
            self._pins.pop(owner, None)
        self.collect()

    def pinned(self) -> set[int]:
        with self._lock:
            return set().union(*self._pins.values()) if self._pins else set()

    def collect(self) -> list[int]:
        """Delete retired versions that nothing pins; returns what was deleted."""
        with self._lock:
            pinned = set().union(*self._pins.values()) if self._pins else set()
            doomed = [v for v in self._retired if v not in pinned]
            if not doomed:
                return []
            self._retired = [v for v in self._retired if v in pinned]
            self._write_manifest()  # forget first: a crash mid-delete leaves an unlisted folder, not a dangling entry
        for v in doomed:
            shutil.rmtree(self.path(v), ignore_errors=True)
        return doomed

    def restore(self, members: list[int], keep: Iterable[int] = ()) -> None:
        """Make the pool exactly `members` (a resumed trainer checkpoint's view); newer versions are
        dropped (the resumed run writes them again), older ones retired. `keep` lists retired versions
        the resumed run still reads: they must be on disk too."""
        with self._lock:
            missing = [v for v in sorted(set(members) | set(keep)) if not self.path(v).is_dir()]
            if missing:
                raise HistoryError(f"{self.root}: cannot resume, history versions {missing} are missing on disk")
            known = set(self._members) | set(self._retired)
            newest = max(members) if members else -1
            newer = [v for v in known if v > newest]
            self._members = list(members)
            self._retired = sorted(v for v in known if v not in members and v <= newest)
            self._write_manifest()
            listed = set(self._members) | set(self._retired)
        for v in newer:
            shutil.rmtree(self.path(v), ignore_errors=True)
        for stray in self.root.glob("v*"):  # complete folders a crash left out of the manifest
            if stray.is_dir() and stray.name[1:].isdigit() and int(stray.name[1:]) not in listed:
                shutil.rmtree(stray, ignore_errors=True)
