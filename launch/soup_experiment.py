"""Drive a SOUP run from Python with nemo-run: LocalExecutor on this machine, SlurmExecutor on a cluster.

    bash tools/setup_launch.sh      # .venv-launch: nemo-run, apart from the trainer's venv
    .venv-launch/bin/python launch/soup_experiment.py --executor local --config configs/tiny_cpu.yaml
    .venv-launch/bin/python launch/soup_experiment.py --executor slurm --config configs/tiny_3node_cpu.yaml \
        launch.slurm.account=soup

The job's shape comes from the config's `launch.*` keys, as for `soup-megatron launch`, and the trainer's
interpreter (`--trainer-python`, default .venv/bin/python) checks the config first: a bad key fails here,
before anything is queued.
- local: nemo-run's LocalExecutor runs `soup-megatron launch --executor local` (torchrun --standalone with
  `launch.ranks_per_node` ranks, from the config frozen in the run directory).
- slurm: `soup-megatron launch --executor slurm --layout` freezes the config and describes the job, and its
  tasks run the commands the sbatch scripts of `soup-megatron launch` run. The conversion
  (`launch.convert_from_hf`) is a job of its own first. The training job has one torchrun per training node
  (c10d rendezvous on the first); with `serve` tasks (`rollout.sglang.servers_from=serve` and
  `launch.slurm.rollout_nodes` >= 1) it is a heterogeneous job: a component for the training nodes, one for
  each set of rollout nodes (colocated policy and history servers share theirs), and nemo-run ends the job
  when the trainer's tasks end. nemo-run's tunnel is local: this machine's sbatch. Not here, unlike the
  sbatch job: USR1 -> checkpoint -> requeue, and serve tasks beside the trainer (rollout_nodes=0). A job
  that ended early resumes from its checkpoint when submitted again.
Exits non-zero unless every job SUCCEEDED: nemo-run itself returns normally when a job fails.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import nemo_run as run

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (YAML), as for soup-megatron launch")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--trainer-python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="interpreter with soup-megatron installed (on the nodes, for slurm)")
    parser.add_argument("--name", default="soup", help="experiment name")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.steps=20")
    return parser.parse_args(argv)


def soup_launch(args, *flags: str) -> str:
    """`soup-megatron launch` in the trainer's interpreter (this venv has nemo-run, not the trainer)."""
    done = subprocess.run([args.trainer_python, "-m", "soup_megatron.cli", "launch", *flags, "--config", args.config,
                           *args.overrides], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"soup_experiment: the config does not validate:\n{done.stderr.strip()}")
    return done.stdout


def script(*lines: str) -> run.Script:
    return run.Script(inline="\n".join([f"cd {shlex.quote(str(ROOT))}", *lines]) + "\n")


def slurm_executor(layout: dict, nodes: int, tasks_per_node: int, cpus: int) -> run.SlurmExecutor:
    s = layout["slurm"]
    # LocalTunnel(job_dir=""): submit with this machine's sbatch; a non-empty job_dir makes nemo-run
    # write the script somewhere other than where it submits it (nemo-run 0.11)
    return run.SlurmExecutor(account=s["account"], partition=s["partition"] or None, qos=s["qos"] or None,
                             time=s["time"], mem=s["mem"] or None, nodes=nodes, ntasks_per_node=tasks_per_node,
                             cpus_per_task=cpus, gpus_per_node=s["gpus_per_node"] or None,
                             container_image=s["container_image"] or None, container_mounts=s["container_mounts"],
                             setup_lines="\n".join(s["setup"]) or None,
                             tunnel=run.LocalTunnel(job_dir=""), packager=run.Packager())


def training_job(layout: dict) -> tuple[list[run.Script], list[run.SlurmExecutor]]:
    """The trainer's tasks, then one component per set of rollout nodes running its serve commands."""
    s = layout["slurm"]
    tasks = [script(layout["interface_setup"].rstrip("\n"),
                    'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                    layout["train_command"])]
    executors = [slurm_executor(layout, layout["train_nodes"], 1, s["cpus_per_task"])]
    rollout_nodes: dict[tuple, list[str]] = {}  # colocated groups' serve steps share their nodes
    for step in layout["serve_steps"]:
        rollout_nodes.setdefault((step["relative"], step["nodes"], step["per_node"], step["cpus"]), []).append(
            step["command"])
    for (_, nodes, per_node, cpus), commands in sorted(rollout_nodes.items()):
        tasks.append(script(*(f"{command} &" for command in commands), "wait"))
        executors.append(slurm_executor(layout, nodes, per_node, cpus))
    if len(executors) > 1:
        executors[0].heterogeneous = True
        executors[0].wait_time_for_group_job = 0  # the trainer waits for the servers itself
        executors[0].monitor_group_job_wait_time = 5  # the trainer's end ends the job (the servers are killed)
    return tasks, executors


def add_slurm_jobs(exp: run.Experiment, args) -> None:
    layout = json.loads(soup_launch(args, "--executor", "slurm", "--layout", "--dryrun"))
    s = layout["slurm"]
    if not s["account"]:
        raise SystemExit("soup_experiment: launch.slurm.account is empty: nemo-run's SlurmExecutor needs an account")
    if layout["serve_steps"] and s["rollout_nodes"] == 0:
        raise SystemExit("soup_experiment: rollout.sglang.servers_from=serve with launch.slurm.rollout_nodes=0 puts "
                         "the serve tasks beside the trainer, which this job cannot do: give them rollout nodes, or "
                         "submit with `soup-megatron launch --executor slurm`")
    soup_launch(args, "--executor", "slurm", "--layout")  # now freeze the config the tasks run from
    if layout["convert_command"]:
        converted = shlex.quote(layout["converted_checkpoint"])
        exp.add(script(f"if [ ! -f {converted}/soup_megatron.json ]; then", f"  {layout['convert_command']}", "fi"),
                executor=slurm_executor(layout, 1, 1, s["cpus_per_task"]), name="convert")
    tasks, executors = training_job(layout)
    if len(tasks) == 1:
        exp.add(tasks[0], executor=executors[0], name="train")
    else:
        exp.add(tasks, executor=executors, name="train")


def main(argv=None) -> int:
    args = parse_args(argv)
    with run.Experiment(args.name) as exp:
        if args.executor == "local":
            soup_launch(args, "--executor", "local", "--dryrun")
            exp.add(script(shlex.join([args.trainer_python, "-m", "soup_megatron.cli", "launch", "--executor",
                                       "local", "--config", args.config, *args.overrides])),
                    executor=run.LocalExecutor(), name="train")
        else:
            add_slurm_jobs(exp, args)
        exp.run(sequential=True, detach=False)
    states = exp.status(return_dict=True) or {}  # after the block: leaving it is what waits for the jobs
    for name, info in states.items():
        print(f"soup_experiment: {name} {info['status']}")
    return 0 if states and all(str(info["status"]).endswith("SUCCEEDED") for info in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
