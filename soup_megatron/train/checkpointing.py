"""Trainer checkpoints: everything needed to continue after a step (actor weights and optimizer, the history
pool's members and the versions still needed, the prefix source's pending jobs or replay buffer, and the
one-step-off rollout collected ahead), written atomically; `latest` names the newest and flips last, so a
run killed at any point resumes from a complete checkpoint and reaches the same state as one never killed."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..actor.base import Actor
from ..history.base import PrefixSource
from ..history.store import CheckpointStore
from ..io import atomic_dir, atomic_write_json, atomic_write_text, read_json, remove_tmp_leftovers
from ..model.hf import CheckpointError
from .collect import Collected


@dataclass
class Resumed:
    """What a checkpoint restores besides the actor and the history pool."""

    step: int
    prefixes: dict  # the prefix source's state
    ahead: Optional[Collected]


class TrainerCheckpoints:
    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep
        root.mkdir(exist_ok=True)
        remove_tmp_leftovers(root)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, None for a fresh run."""
        pointer = self.root / "latest"
        return self.root / pointer.read_text().strip() if pointer.is_file() else None

    def save(self, step: int, actor: Actor, store: CheckpointStore, prefixes: PrefixSource,
             ahead: Optional[Collected]) -> None:
        """Checkpoint `step` steps, then keep the newest `keep` and the history versions any of them needs."""
        name = f"step_{step:06d}"
        needs = sorted(set(store.members()) | prefixes.pinned_versions())  # history it resumes with
        with atomic_dir(self.root / name) as tmp:
            actor.save_state(tmp / "actor")
            torch.save({"prefixes": prefixes.state(), "collected": ahead}, tmp / "prefixes.pt")
            atomic_write_json(tmp / "state.json", {"step": step, "history_members": store.members(),
                                                   "history_needed": needs})
        atomic_write_text(self.root / "latest", name + "\n")
        for old in sorted(self.root.glob("step_*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.pin_history(store)
        store.collect()

    def load(self, path: Path, actor: Actor, store: CheckpointStore) -> Resumed:
        """The actor's weights and optimizer and the history pool as checkpoint `path` left them."""
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{self.root / 'latest'} names {path.name}, but {path} is missing or "
                                  "incomplete; restore it or start a fresh run in another trainer.out_dir")
        state = read_json(path / "state.json")
        actor.load_state(path / "actor")
        store.restore(state["history_members"], keep=state["history_needed"])
        self.pin_history(store)
        extra = torch.load(path / "prefixes.pt", weights_only=False)
        return Resumed(state["step"], extra["prefixes"], extra.get("collected"))

    def pin_history(self, store: CheckpointStore) -> None:
        """Every kept trainer checkpoint can be resumed: keep the history versions any of them needs."""
        needed: set[int] = set()
        for state in self.root.glob("step_*/state.json"):
            needed |= set(read_json(state)["history_needed"])
        store.pin("trainer-checkpoints", needed & set(store.on_disk()))
