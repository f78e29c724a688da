"""Rollout engines: the on-policy continuation engine and the historical-policy engines.

`local` runs `transformers` in-process; `sglang` is a client of the run's SGLang server groups
(`policy` for continuations, `history` for prefixes), started by `RolloutServers`.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RolloutConfig
from .base import Generation, GenerationRequest, RolloutEngine


def build_engine(cfg: RolloutConfig, model_path: str | Path, version: int = 0, run_dir: str | Path | None = None,
                 group: str = "policy", server: int | None = None, return_routing: bool = False) -> RolloutEngine:
    """An engine serving `model_path` as `version`. SGLang servers already serve the weights they were
    launched with; their engine only records the version (it loads others with `load_weights`).
    `server`: only that server of the group (SGLang), so that servers of one group can hold different weights.
    `return_routing`: generations carry a MoE model's routing (SGLang servers started to return it)."""
    if cfg.backend == "local":
        from .local import LocalEngine

        return LocalEngine(model_path, version, return_routing=return_routing)
    if cfg.backend == "sglang":
        from ..model.hf import stop_token_ids
        from ..model.routing import checkpoint_routing_shape
        from .sglang_engine import SGLangEngine

        if run_dir is None:
            raise ValueError("rollout.backend=sglang needs the run directory (it holds the server addresses)")
        return SGLangEngine(Path(run_dir) / "servers" / f"{group}.json", cfg.sglang, run_dir, version,
                            stop_ids=stop_token_ids(model_path), server=server,
                            routing_shape=checkpoint_routing_shape(model_path) if return_routing else None)
    raise ValueError(f"rollout.backend={cfg.backend!r} is not available; choose one of: local, sglang")


__all__ = ["Generation", "GenerationRequest", "RolloutEngine", "build_engine"]
