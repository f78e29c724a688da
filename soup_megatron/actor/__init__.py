"""Actors: the policy being trained, behind the protocol in `base.py`."""

from __future__ import annotations

from pathlib import Path

from ..config import ActorConfig
from .base import Actor, TokenBatch


def build_actor(cfg: ActorConfig, model_path: str | Path) -> Actor:
    if cfg.backend == "local":
        from .local import LocalActor

        return LocalActor(model_path, cfg)
    raise ValueError(f"actor.backend={cfg.backend!r} is not available; choose one of: local")


__all__ = ["Actor", "TokenBatch", "build_actor"]
