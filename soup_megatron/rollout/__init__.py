"""Rollout engines: the on-policy continuation engine and the historical-policy engines."""

from __future__ import annotations

from pathlib import Path

from .base import Generation, GenerationRequest, RolloutEngine


def build_engine(backend: str, model_path: str | Path, version: int = 0) -> RolloutEngine:
    if backend == "local":
        from .local import LocalEngine

        return LocalEngine(model_path, version)
    raise ValueError(f"rollout.backend={backend!r} is not available; choose one of: local")


__all__ = ["Generation", "GenerationRequest", "RolloutEngine", "build_engine"]
