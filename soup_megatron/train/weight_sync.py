"""Weight sync, trainer -> on-policy rollout engine, after every update.

- memory: the actor's state dict is copied into the in-process engine (no files).
- disk: the actor exports an HF checkpoint inside the run directory (`<run>/weights/v<step>`, written
  atomically) and the engine loads it (SGLang: `/update_weights_from_disk` on every policy server).
  The previous export is deleted once the new one is served; a restarted server reloads the current.
- auto: memory for `rollout.backend=local`, disk for `sglang`.

SGLang's `update_weights_from_tensor` (colocated) and `update_weights_from_distributed` (NCCL) need
CUDA servers; they are not built, and config validation refuses anything but disk with SGLang.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..actor.base import Actor
from ..io import atomic_dir
from ..rollout.base import RolloutEngine


def sync_mode(backend: str, mode: str) -> str:
    return ("memory" if backend == "local" else "disk") if mode == "auto" else mode


class WeightSync:
    def __init__(self, mode: str, actor: Actor, engine: RolloutEngine, run_dir: Path):
        self.mode, self.actor, self.engine = mode, actor, engine
        self.root = Path(run_dir) / "weights"

    def __call__(self, version: int) -> None:
        if self.mode == "memory":
            self.engine.load_weights(self.actor.rollout_weights(), version)
            return
        path = self.root / f"v{version:06d}"
        with atomic_dir(path) as tmp:
            self.actor.save_hf(tmp)
        self.engine.load_weights(path, version)
        for old in self.root.glob("v*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
