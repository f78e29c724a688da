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
`--layout` freezes the config and prints the job's layout and its tasks' commands as JSON instead of
submitting (with `--dryrun`: writes nothing), for a launcher that submits the same job itself
(launch/soup_experiment.py, nemo-run): the commands are the ones the sbatch scripts run.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
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


def train_command(cfg: Config, config_file: Path) -> str:
    """A training node's task: one torchrun, in the c10d rendezvous on the job's first node ($MASTER_ADDR)."""
    s = cfg.launch.slurm
    return (f"{cfg.launch.python} -m torch.distributed.run --nnodes={s.nodes - s.rollout_nodes} "
            f"--nproc-per-node={cfg.launch.ranks_per_node} \\\n"
            f"    --rdzv-backend=c10d --rdzv-endpoint=\"$MASTER_ADDR:{cfg.launch.rendezvous_port}\" "
            f"--rdzv-id=\"$SLURM_JOB_ID\" \\\n"
            f"    -m soup_megatron.cli train --config {config_file}")


def serve_command(cfg: Config, config_file: Path, group: str) -> str:
    """A rollout task: one `soup-megatron serve` of `group` (its index: the task's SLURM_PROCID)."""
    return f"{cfg.launch.python} -m soup_megatron.cli serve --config {config_file} --group {group}"


def convert_command(cfg: Config) -> str:
    """The conversion task, on one node: the HF checkpoint to megatron at the training TP and PP=1 (torch_dist
    checkpoints load under any other layout); a MoE model's experts split over the training EP when it fits the
    node, so no rank reads every expert. The jobs run it only while the converted checkpoint is missing (a
    requeued job does not redo it)."""
    mc, run_dir = cfg.actor.megatron, Path(cfg.trainer.out_dir)
    ep = mc.expert_parallel if mc.tensor_parallel * mc.expert_parallel <= cfg.launch.ranks_per_node else 1
    return (f"{cfg.launch.python} -m torch.distributed.run --standalone --nproc-per-node={mc.tensor_parallel * ep} "
            f"\\\n      -m soup_megatron.mcore.convert hf-to-megatron --hf {cfg.model.path} --out "
            f"{run_dir / CONVERTED} \\\n      --tp {mc.tensor_parallel} --pp 1{f' --ep {ep}' if ep > 1 else ''}")


def interface_setup(cfg: Config) -> str:
    """Shell lines that put NCCL and gloo on launch.slurm.network_interface, or end the task at once naming the
    node's interfaces when it has no such one (a rank would wait on it); "" when none is set."""
    name = cfg.launch.slurm.network_interface
    if not name:
        return ""
    return (f"if [ ! -d /sys/class/net/{name} ]; then\n"
            f"  echo \"launch.slurm.network_interface={name}: no such interface on $(hostname) "
            f"(it has: $(ls /sys/class/net | paste -sd' '))\" >&2\n"
            f"  exit 2\nfi\nexport NCCL_SOCKET_IFNAME={name} GLOO_SOCKET_IFNAME={name}\n")


def job_layout(cfg: Config, config_file: Path) -> dict:
    """The training job as a launcher other than sbatch needs it: nodes, tasks and the commands they run."""
    s = cfg.launch.slurm
    return {"run_dir": cfg.trainer.out_dir, "config_file": str(config_file), "job_name": cfg.launch.job_name,
            "slurm": asdict(s), "train_nodes": s.nodes - s.rollout_nodes,
            "ranks_per_node": cfg.launch.ranks_per_node, "interface_setup": interface_setup(cfg),
            "train_command": train_command(cfg, config_file),
            "serve_steps": [{**asdict(step), "command": serve_command(cfg, config_file, step.group)}
                            for step in serve_steps(cfg)],
            "convert_command": convert_command(cfg) if cfg.launch.convert_from_hf else "",
            "converted_checkpoint": str(Path(cfg.trainer.out_dir) / CONVERTED)}


def slurm_jobs(cfg: Config, config_note: str) -> list[Job]:
    s = cfg.launch.slurm
    check_training_ranks(cfg)
    run_dir = Path(cfg.trainer.out_dir)  # as configured: relative paths are relative to the submission directory
    common = dict(job_name=cfg.launch.job_name, s=s, log_dir=run_dir / "slurm", config_note=config_note)
    jobs = []
    config_file = run_dir / "launch" / "config.yaml"
    if cfg.launch.convert_from_hf:
        jobs.append(Job("convert", _render("convert.sbatch.j2", **common, megatron_checkpoint=run_dir / CONVERTED,
                                            convert_command=convert_command(cfg))))
    steps = [(step, serve_command(cfg, config_file, step.group)) for step in serve_steps(cfg)]
    jobs.append(Job("train", _render("train.sbatch.j2", **common, run_dir=run_dir, serve_steps=steps,
                                     train_nodes=s.nodes - s.rollout_nodes, interface_setup=interface_setup(cfg),
                                     train_command=train_command(cfg, config_file)),
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


def launch(cfg: Config, executor: str, dryrun: bool, config_note: str, layout: bool = False) -> list[str]:
    """Submit (or, with `dryrun`, print) the run; returns the submitted job ids (slurm) or []. With `layout`,
    freeze the config and print the job's layout as JSON instead of submitting (see the module's docstring)."""
    cfg = training_config(cfg)
    run_dir = Path(cfg.trainer.out_dir)
    config_file = run_dir / "launch" / "config.yaml"
    if layout and executor != "slurm":
        raise ConfigError("--layout describes a Slurm job: use it with --executor slurm")
    if executor == "slurm":
        jobs = slurm_jobs(cfg, config_note)
        if dryrun and layout:
            print(json.dumps(job_layout(cfg, config_file)))
            return []
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
    if layout:
        print(json.dumps(job_layout(cfg, config_file)))
        return []
    ids: dict[str, str] = {}
    for job in jobs:
        script = run_dir / "launch" / f"{job.name}.sbatch"
        atomic_write_text(script, job.script)
        ids[job.name] = _sbatch(script, ids.get(job.depends_on) if job.depends_on else None)
        # the command's output (stdout, like sbatch's): the job ids a user or a script goes on with
        print(f"submitted {job.name}: job {ids[job.name]} (log {run_dir / 'slurm'}/"
              f"{cfg.launch.job_name}{'-convert' if job.name == 'convert' else ''}-{ids[job.name]}.out)")
    return list(ids.values())
