"""`soup-megatron serve`: one SGLang server of a run's `policy` or `history` group, on a rollout node.

The Slurm job starts one serve task per server (`cluster/templates/train.sbatch.j2`); the trainer,
with `rollout.sglang.servers_from=serve`, starts none and waits for theirs. Each task
1. takes the run's API key (`<run>/servers/api_key`; the first process to need it makes it);
2. starts SGLang on all interfaces at a free port, on this node's GPUs: `rollout.sglang.base_gpu_ids`
   when set, else the slot of its local task index (tp_size x dp_size GPUs per server);
3. when /health answers, publishes `<run>/servers/<group>-<index>.serve.json` with the URL under this
   node's name; the trainer talks to it as to its own servers;
4. restarts the server on the same port when it dies (the trainer waits for it and, as the server
   comes back with its launch weights, loads the group's current weights into it again);
5. on SIGUSR1 (from the job script once training has ended: srun passes USR1 on to its tasks, while
   TERM makes it kill them) stops the server, removes the record and exits 0; SIGTERM does the same
   and exits 143.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path

from ..config import Config, ConfigError
from ..io import atomic_write_text, make_private_dir
from ..log import get_logger
from .sglang_servers import (
    GROUPS,
    NEW_PORT_TRIES,
    ManagedServer,
    ServerError,
    free_port,
    group_mem_fraction,
    group_size,
    run_api_key,
    serve_record,
)

log = get_logger(__name__)


def _task_index(variable: str, given: int | None) -> int:
    if given is not None:
        return given
    return int(os.environ.get(variable, 0))


def base_gpu(cfg: Config, group: str, index: int, local_index: int) -> int | None:
    sg = cfg.rollout.sglang
    if sg.base_gpu_ids:  # colocated history servers sit on the policy servers' GPUs
        colocated = cfg.soup.history_placement == "colocated"
        return sg.base_gpu_ids[index + (0 if group == "policy" or colocated else sg.policy_servers)]
    return local_index * sg.tp_size * sg.dp_size if sg.device == "cuda" else None


def serve(cfg: Config, group: str, index: int | None = None, local_index: int | None = None) -> None:
    """Run server `index` of `group` until SIGUSR1 / SIGTERM (index and local index default to Slurm's task ids)."""
    sg = cfg.rollout.sglang
    if group not in GROUPS:
        raise ConfigError(f"--group {group!r}: expected one of {', '.join(GROUPS)}")
    if sg.servers_from != "serve":
        raise ConfigError("soup-megatron serve needs rollout.sglang.servers_from=serve in the run's config "
                          "(otherwise the trainer starts its own servers and never looks for these)")
    index = _task_index("SLURM_PROCID", index)
    local_index = _task_index("SLURM_LOCALID", local_index)
    if not 0 <= index < group_size(sg, group):
        raise ConfigError(f"server index {index} is outside the {group} group: rollout.sglang.{group}_servers="
                          f"{group_size(sg, group)}")
    workdir = make_private_dir(Path(cfg.trainer.out_dir) / "servers")
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    server = ManagedServer(sg, str(cfg.model.path), "0.0.0.0", free_port("0.0.0.0"), run_api_key(workdir), workdir,
                           f"{group}-{index}", base_gpu(cfg, group, index, local_index), group_mem_fraction(sg, group),
                           public_host=node,
                           return_routing=group == "policy" and cfg.actor.routing_replay == "rollout")
    record = serve_record(workdir, group, index)
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda signum, frame: stop.set())
    try:
        server.start()
        server.wait_healthy(sg.startup_timeout, new_port_tries=NEW_PORT_TRIES)
        atomic_write_text(record, json.dumps({"url": server.url, "node": node, "pid": os.getpid(),
                                              "job": os.environ.get("SLURM_JOB_ID", "")}))
        log.info(f"{group} server {index} ready at {server.url} (log {server.log_path})")
        while not stop.wait(1.0):
            if not server.alive():
                log.warning(f"{group} server {index} exited; restarting it on the same port; last lines of "
                            f"{server.log_path}:\n{server.log_tail()}")
                server.stop()
                server.start()
                server.wait_healthy(sg.startup_timeout)
    except ServerError as exc:
        raise SystemExit(f"soup-megatron serve: {exc}") from None
    finally:
        record.unlink(missing_ok=True)
        server.stop()
