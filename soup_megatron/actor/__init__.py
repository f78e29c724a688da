"""Actors: the policy being trained, behind the protocol in `base.py`."""

from __future__ import annotations

from pathlib import Path

from ..config import ActorConfig
from .base import Actor, TokenBatch


def build_actor(cfg: ActorConfig, model_path: str | Path, samples_per_update: int | None = None) -> Actor:
    """`samples_per_update` (when known) lets a parallel actor check its batch split at start-up."""
    if cfg.backend == "local":
        from .local import LocalActor

        return LocalActor(model_path, cfg)
    if cfg.backend == "megatron":
        from .megatron import MegatronActor

        return MegatronActor(model_path, cfg, samples_per_update)
    raise ValueError(f"actor.backend={cfg.backend!r} is not available; choose one of: local, megatron")


__all__ = ["Actor", "TokenBatch", "build_actor"]
