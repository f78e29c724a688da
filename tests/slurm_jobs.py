"""Following Slurm jobs from tests: their ids, states and logs, and a run's metrics (tests/test_slurm.py on the
one-node cluster, tests/test_multinode.py on a cluster of its own, whose SLURM_CONF it passes as `env`)."""

import json
import subprocess
import time
from pathlib import Path


def squeue_state(job: str, env=None) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                          env=env).stdout.strip()


def job_id(done, name: str = "") -> str:
    """The id of the job `launch` submitted (its first, or the one called `name`: "train", "convert")."""
    return done.stdout.split(f"{name}: job " if name else "job ")[1].split()[0]


def state(job: str, env=None) -> str:
    """The job's state in accounting: its last record (a requeued job has one per start), reason dropped."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"], capture_output=True, text=True,
                         env=env).stdout
    return out.strip().splitlines()[-1].split()[0] if out.strip() else "UNKNOWN"


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def wait_done(job: str, timeout: float = 900, env=None) -> str:
    """The job's final state. Both signs are awaited: squeue no longer lists it (a squeue that failed, as a busy
    slurmctld's can, is no answer) and slurmdbd has recorded the end, which lags the controller by a moment.
    `env`: the environment naming another cluster's SLURM_CONF."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=env)
        gone = (queued.returncode == 0 and not queued.stdout.strip()) or "Invalid job id" in queued.stderr
        if gone and state(job, env) in FINAL_STATES:
            return state(job, env)
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} not finished after {timeout}s (squeue: {squeue_state(job, env)!r}, "
                         f"sacct: {state(job, env)!r})")


def metrics(out: Path) -> list[dict]:
    # timings, and bytes sent to follower ranks (save commands carry the run directory's path), are not state
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "megatron/bytes"))}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def log_of(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "slurm").glob("*.out")))
