"""`soup-megatron launch`: one config, two executors.

- `local`: the training command on this machine (torchrun with `launch.ranks_per_node` ranks).
- `slurm`: sbatch scripts rendered from `templates/` — an optional HF -> Megatron conversion job, then
  the training job with an `afterok` dependency on it. The training job runs one torchrun per trainer
  node under srun, asks for USR1 before its time limit, checkpoints and requeues itself (see the
  template). With `rollout.sglang.servers_from=serve` it also starts one `soup-megatron serve` task per
  SGLang server: on the last `launch.slurm.rollout_nodes` nodes (each group on whole nodes; with
  `soup.history_placement=colocated` both groups on all of them, history server i beside policy server i),
  or beside the trainer on its first node when that is 0.

Launching freezes the run's config: the resolved YAML goes to `<trainer.out_dir>/launch/config.yaml`
and the job trains from that file, so a requeued job resumes with exactly what was submitted.
`--dryrun` prints the scripts and writes nothing; `slurm/*.sbatch` are dry runs of the recipes.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ..config import Config, ConfigError, to_yaml
from ..errors import SoupError
from ..io import atomic_write_text, make_private_dir

TEMPLATES = Path(__file__).parent / "templates"
CONVERTED = "megatron_init"  # where the conversion job writes the starting checkpoint, inside the run dir


class LaunchError(SoupError, RuntimeError):
    """The cluster refused or could not run the job."""

    label = "launch error"


@dataclass
class Job:
    name: str
    script: str
    depends_on: str | None = None  # the name of a job that must end successfully first


@dataclass
class ServeStep:
    """One srun of `soup-megatron serve` tasks: the servers of one group."""
    group: str
    nodes: int
    relative: int  # first node, counted within the job's allocation
    tasks: int
    per_node: int
    cpus: int


def serve_steps(cfg: Config) -> list[ServeStep]:
    s, sg = cfg.launch.slurm, cfg.rollout.sglang
    if cfg.rollout.backend != "sglang" or sg.servers_from != "serve":
        return []
    counts = {"policy": sg.policy_servers, "history": sg.history_servers}
    if s.rollout_nodes == 0:  # beside the trainer on its first node
        return [ServeStep(g, 1, 0, n, n, max(1, s.cpus_per_task // n)) for g, n in counts.items()]
    first = s.nodes - s.rollout_nodes
    if cfg.soup.history_placement == "colocated":  # history server i on policy server i's node and GPUs
        per_node = sg.policy_servers // s.rollout_nodes
        if sg.policy_servers % s.rollout_nodes:
            raise ConfigError(f"launch.slurm.rollout_nodes={s.rollout_nodes} with rollout.sglang.policy_servers="
                              f"{sg.policy_servers}: every rollout node must hold the same number of policy servers")
        return [ServeStep(g, s.rollout_nodes, first, n, per_node, max(1, s.cpus_per_task // (2 * per_node)))
                for g, n in counts.items()]
    total = sum(counts.values())
    per_node = total // s.rollout_nodes
    if total % s.rollout_nodes or any(n % per_node for n in counts.values()):
        raise ConfigError(
            f"launch.slurm.rollout_nodes={s.rollout_nodes} with rollout.sglang.policy_servers={sg.policy_servers} and "
            f"history_servers={sg.history_servers}: every rollout node must hold the same number of servers "
            f"({total} / {s.rollout_nodes} = {total / s.rollout_nodes:.2f}) and each group whole nodes")
    steps = []
    for group, n in counts.items():
        steps.append(ServeStep(group, n // per_node, first, n, per_node, max(1, s.cpus_per_task // per_node)))
        first += n // per_node
    return steps


def _render(template: str, **values) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True)
    return env.get_template(template).render(**values)


def training_config(cfg: Config) -> Config:
    """The config the job trains with: when converting first, the actor starts from the converted checkpoint."""
    if not cfg.launch.convert_from_hf:
        return cfg
    if cfg.actor.backend != "megatron":
        raise ConfigError("launch.convert_from_hf=true needs actor.backend=megatron (the conversion writes a "
                          "megatron checkpoint for it)")
    converted = str(Path(cfg.trainer.out_dir) / CONVERTED)
    return replace(cfg, actor=replace(cfg.actor, megatron=replace(cfg.actor.megatron, checkpoint=converted)))


def check_training_ranks(cfg: Config) -> None:
    """The training nodes' ranks must make whole megatron model replicas (refused before anything is submitted)."""
    s, mc = cfg.launch.slurm, cfg.actor.megatron
    ranks = (s.nodes - s.rollout_nodes) * cfg.launch.ranks_per_node
    replica = mc.tensor_parallel * mc.pipeline_parallel * mc.context_parallel
    if cfg.actor.backend == "megatron" and ranks % replica:
        raise ConfigError(
            f"launch.slurm.nodes={s.nodes} less rollout_nodes={s.rollout_nodes}, x launch.ranks_per_node="
            f"{cfg.launch.ranks_per_node}: {ranks} training ranks, not a multiple of actor.megatron tensor_parallel x "
            f"pipeline_parallel x context_parallel = {mc.tensor_parallel} x {mc.pipeline_parallel} x "
            f"{mc.context_parallel} = {replica}")


def slurm_jobs(cfg: Config, config_note: str) -> list[Job]:
    s = cfg.launch.slurm
    check_training_ranks(cfg)
    run_dir = Path(cfg.trainer.out_dir)  # as configured: relative paths are relative to the submission directory
    common = dict(job_name=cfg.launch.job_name, s=s, log_dir=run_dir / "slurm", python=cfg.launch.python,
                  config_note=config_note)
    jobs = []
    if cfg.launch.convert_from_hf:
        mc = cfg.actor.megatron
        # one node at the training TP and PP=1: torch_dist checkpoints load under any other layout; a MoE model's
        # experts split over the training EP when it fits the node, so no rank reads every expert
        ep = mc.expert_parallel if mc.tensor_parallel * mc.expert_parallel <= cfg.launch.ranks_per_node else 1
        jobs.append(Job("convert", _render("convert.sbatch.j2", **common, hf_checkpoint=cfg.model.path,
                                            megatron_checkpoint=run_dir / CONVERTED, tp=mc.tensor_parallel, pp=1,
                                            ep=ep, convert_ranks=mc.tensor_parallel * ep)))
    jobs.append(Job("train", _render("train.sbatch.j2", **common, run_dir=run_dir,
                                     ranks_per_node=cfg.launch.ranks_per_node, port=cfg.launch.rendezvous_port,
                                     serve_steps=serve_steps(cfg), train_nodes=s.nodes - s.rollout_nodes,
                                     config_file=run_dir / "launch" / "config.yaml"),
                    depends_on="convert" if cfg.launch.convert_from_hf else None))
    return jobs


def local_command(cfg: Config, config_file: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={cfg.launch.ranks_per_node}", "-m", "soup_megatron.cli", "train", "--config",
            str(config_file)]


def _sbatch(script: Path, dependency: str | None) -> str:
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: --executor slurm needs a Slurm client on this machine")
    cmd = ["sbatch", "--parsable", *([f"--dependency=afterok:{dependency}"] if dependency else []), str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        message = done.stderr.strip()
        if "partition" in message.lower():
            message += f" (partitions on this cluster: {_partitions() or 'none found'}; set launch.slurm.partition)"
        raise LaunchError(f"sbatch {script} failed: {message}")
    return done.stdout.strip().split(";")[0]


def check_cluster_has_nodes(cfg: Config) -> None:
    """A job of more nodes than its partition has would never start (and its conversion job would run for
    nothing): refused before anything is written or submitted."""
    if shutil.which("sinfo") is None:
        return  # _sbatch says that the Slurm client is missing
    done = subprocess.run(["sinfo", "-h", "-o", "%P %D"], capture_output=True, text=True)
    sizes: dict[str, int] = {}
    default = ""
    for line in done.stdout.splitlines() if done.returncode == 0 else []:  # a line per partition and node state
        name, count = line.split()
        default = name.rstrip("*") if name.endswith("*") else default
        sizes[name.rstrip("*")] = sizes.get(name.rstrip("*"), 0) + int(count)
    partition, wanted = cfg.launch.slurm.partition or default, cfg.launch.slurm.nodes
    if partition in sizes and wanted > sizes[partition]:
        raise LaunchError(f"launch.slurm.nodes={wanted}: partition {partition} has {sizes[partition]} node(s)")


def _partitions() -> str:
    done = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    return ", ".join(p.rstrip("*") for p in done.stdout.split()) if done.returncode == 0 else ""


def launch(cfg: Config, executor: str, dryrun: bool, config_note: str) -> list[str]:
    """Submit (or, with `dryrun`, print) the run; returns the submitted job ids (slurm) or []."""
    cfg = training_config(cfg)
    run_dir = Path(cfg.trainer.out_dir)
    config_file = run_dir / "launch" / "config.yaml"
    if executor == "slurm":
        jobs = slurm_jobs(cfg, config_note)
        if dryrun:
            for job in jobs:
                print(job.script, end="")
            return []
    elif serve_steps(cfg):
        raise ConfigError("rollout.sglang.servers_from=serve needs --executor slurm, which starts the serve tasks "
                          "(or start `soup-megatron serve` for each server yourself and run `soup-megatron train`)")
    elif dryrun:
        print(shlex.join(local_command(cfg, config_file)))
        return []
    if executor == "slurm":
        check_cluster_has_nodes(cfg)
    make_private_dir(run_dir)
    (run_dir / "launch").mkdir(exist_ok=True)
    atomic_write_text(config_file, to_yaml(cfg))
    if executor == "local":
        done = subprocess.run(local_command(cfg, config_file))
        if done.returncode != 0:
            raise LaunchError(f"the local run ended with exit code {done.returncode}")
        return []
    (run_dir / "slurm").mkdir(exist_ok=True)
    ids: dict[str, str] = {}
    for job in jobs:
        script = run_dir / "launch" / f"{job.name}.sbatch"
        atomic_write_text(script, job.script)
        ids[job.name] = _sbatch(script, ids.get(job.depends_on) if job.depends_on else None)
        # the command's output (stdout, like sbatch's): the job ids a user or a script goes on with
        print(f"submitted {job.name}: job {ids[job.name]} (log {run_dir / 'slurm'}/"
              f"{cfg.launch.job_name}{'-convert' if job.name == 'convert' else ''}-{ids[job.name]}.out)")
    return list(ids.values())
