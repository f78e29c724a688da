"""What a run stands on besides its loop, built from the config and closed in reverse order: the actor and
the role of this process (the megatron actor's driver, or a follower rank serving its commands), the SGLang
server groups, the on-policy, reference and colocated-history engines, and the weight sync between actor
and engine. `train`, `bench` and `sweep` (through the trainer) and `bench actor` take their processes from
here, and `eval`, `sweep`'s final evaluation and the benchmarks take their in-process engines from
`in_process_engine`; the trainer is the loop of the data flow.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..actor import build_actor
from ..config import ActorConfig, Config, ConfigError, RolloutConfig, samples_per_update
from ..log import get_logger
from ..model.routing import is_moe_checkpoint
from ..rollout import RolloutEngine, build_engine
from .weight_sync import WeightSync, sync_mode


def is_follower(actor: ActorConfig) -> bool:
    """A launcher rank (torchrun / srun) other than 0 of the megatron actor: it serves the driver's commands."""
    if actor.backend != "megatron":
        return False
    from ..mcore.parallel import launcher_rank

    return launcher_rank() != 0


def follow(actor: ActorConfig, model_path: str, samples: Optional[int] = None) -> int:
    """Serve the driver's actor commands until it closes the actor; the follower's whole job."""
    build_actor(actor, model_path, samples).follow()
    return 0


def in_process_engine(rollout: RolloutConfig, model_path: str | Path, purpose: str = "") -> RolloutEngine:
    """An engine in this process on `model_path`, whatever rollout.backend says: SGLang servers belong to a
    training run (they live in its run directory), and evaluations and measurements run after or without one.
    `purpose` names the caller in the note logged when the config asked for SGLang."""
    if rollout.backend != "local" and purpose:
        get_logger(__name__).warning(f"{purpose}: rollout.backend={rollout.backend} serves training runs; "
                                     "generating in-process")
    return build_engine(replace(rollout, backend="local"), model_path)


class Runtime:
    """The actor, server groups, engines and weight sync of one training run in `out_dir`. `history_servers`:
    the run's mixed samples need history servers of their own (SOUP with prefixes from checkpoints)."""

    def __init__(self, cfg: Config, out_dir: Path, history_servers: bool):
        self.servers = self.engine = self.ref_engine = self.colocated_history = None
        if cfg.actor.routing_replay != "none" and not is_moe_checkpoint(cfg.model.path):
            raise ConfigError(f"actor.routing_replay={cfg.actor.routing_replay}: model.path={cfg.model.path} is a "
                              "dense model (no experts to route to); set actor.routing_replay=none")
        self.actor = build_actor(cfg.actor, cfg.model.path, samples_per_update(cfg))
        try:
            if cfg.rollout.backend == "sglang":
                from ..rollout.sglang_servers import RolloutServers

                self.servers = RolloutServers(cfg.rollout.sglang, cfg.model.path, out_dir,
                                              ["policy"] + (["history"] if history_servers else []),
                                              colocated=cfg.soup.history_placement == "colocated",
                                              return_routing=cfg.actor.routing_replay == "rollout").start()
            self.engine = build_engine(cfg.rollout, cfg.model.path, 0, out_dir,
                                       return_routing=cfg.actor.routing_replay == "rollout")
            self.weight_sync = WeightSync(sync_mode(cfg.rollout.backend, cfg.rollout.weight_sync), self.actor,
                                          self.engine, out_dir)
            if cfg.algo.kl_coef > 0:
                self.ref_engine = build_engine(cfg.rollout, cfg.model.path)
            if cfg.soup.history_placement == "colocated" and history_servers:
                # a client of the history servers that share the policy servers' GPUs; a run that died
                # mid-rollout may have left them paused
                self.colocated_history = build_engine(cfg.rollout, cfg.model.path, 0, out_dir, group="history")
                self.colocated_history.continue_generation()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """The servers this run started, then the actor (and with it the follower ranks)."""
        for part in (self.servers, self.actor):
            if part is not None:
                part.close()
