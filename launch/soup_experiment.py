"""Drive a SOUP run from Python with nemo-run: LocalExecutor on this machine, SlurmExecutor on a cluster.

    bash tools/setup_launch.sh      # .venv-launch: nemo-run, apart from the trainer's venv
    .venv-launch/bin/python launch/soup_experiment.py --executor local --ranks 1 --config configs/tiny_cpu.yaml
    .venv-launch/bin/python launch/soup_experiment.py --executor slurm --account soup --partition debug \
        --ranks 2 --cpus 2 --config configs/tiny_cpu.yaml actor.backend=megatron actor.megatron.tensor_parallel=2

The config and overrides are checked first by the trainer's interpreter (`--trainer-python`, default
.venv/bin/python): a bad key fails here, before anything is queued. The job then runs
`torchrun --nproc-per-node RANKS -m soup_megatron.cli train ...` in this repository (nemo-run's Slurm
executor wraps it in srun; its LocalTunnel submits with this machine's sbatch). Exits non-zero unless
the experiment's task SUCCEEDED: nemo-run itself returns normally when a job fails.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import nemo_run as run

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (YAML), as for soup-megatron train")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--trainer-python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="interpreter with soup-megatron installed (on the nodes, for slurm)")
    parser.add_argument("--ranks", type=int, default=1, help="trainer processes (torchrun --nproc-per-node)")
    parser.add_argument("--name", default="soup", help="experiment name")
    parser.add_argument("--account", default="", help="Slurm account (required by nemo-run's SlurmExecutor)")
    parser.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    parser.add_argument("--time", default="01:00:00", help="Slurm time limit")
    parser.add_argument("--cpus", type=int, default=None, help="Slurm cpus-per-task")
    parser.add_argument("--gpus", type=int, default=None, help="Slurm gpus-per-node")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.steps=20")
    return parser.parse_args(argv)


def check_config(args) -> None:
    """Validate with the trainer's own code (this venv has nemo-run, not the trainer)."""
    done = subprocess.run([args.trainer_python, "-m", "soup_megatron.cli", "launch", "--executor", "local", "--dryrun",
                           "--config", args.config, *args.overrides], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"soup_experiment: the config does not validate:\n{done.stderr.strip()}")


def train_script(args) -> run.Script:
    command = [args.trainer_python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
               "-m", "soup_megatron.cli", "train", "--config", args.config, *args.overrides]
    return run.Script(inline=f"cd {shlex.quote(str(ROOT))}\n{shlex.join(command)}\n")


def executor(args):
    if args.executor == "local":
        return run.LocalExecutor()
    if not args.account:
        raise SystemExit("soup_experiment: --account is required with --executor slurm (nemo-run's SlurmExecutor)")
    # LocalTunnel(job_dir=""): submit with this machine's sbatch; a non-empty job_dir makes nemo-run
    # write the script somewhere other than where it submits it (nemo-run 0.11)
    return run.SlurmExecutor(account=args.account, partition=args.partition, time=args.time, nodes=1,
                             ntasks_per_node=1, cpus_per_task=args.cpus, gpus_per_node=args.gpus,
                             tunnel=run.LocalTunnel(job_dir=""), packager=run.Packager())


def main(argv=None) -> int:
    args = parse_args(argv)
    check_config(args)
    with run.Experiment(args.name) as exp:
        exp.add(train_script(args), executor=executor(args), name="train")
        exp.run(sequential=True, detach=False)
    states = exp.status(return_dict=True)  # after the block: leaving it is what waits for the job
    state = str(states["train"]["status"]) if states and "train" in states else "UNKNOWN"
    print(f"soup_experiment: train {state}")
    return 0 if state.endswith("SUCCEEDED") else 1


if __name__ == "__main__":
    sys.exit(main())
