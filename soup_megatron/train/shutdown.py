"""How a run ends and comes back. SIGTERM (scancel, kill) unwinds like Ctrl-C, so `finally` blocks close
the prefix worker, the SGLang servers and the logs. SIGUSR1 (Slurm's warning before the time limit) does
the same, except for training, where it asks the trainer to checkpoint at the end of the current step
and stop (`stop_asked`); the Slurm job script then requeues the job, and the requeued job resumes."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

stop_requested = threading.Event()
STOP_FILE = "STOP"  # the Slurm job script writes it into the run directory on USR1 (the signal reaches the
# script, the file reaches the trainer on whichever node it runs)


def stop_asked(run_dir: Path) -> bool:
    """Checkpoint and stop at the end of this step: SIGUSR1 reached this process, or the job script's STOP file."""
    return stop_requested.is_set() or (run_dir / STOP_FILE).exists()


def refuse_restart_without_checkpoints(ckpt_root: Path) -> None:
    """A requeued Slurm job whose run directory lost its checkpoints must not quietly start over."""
    from ..model.hf import CheckpointError

    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restart > 0 and not ckpt_root.is_dir():
        raise CheckpointError(
            f"this is restart {restart} of Slurm job {os.environ.get('SLURM_JOB_ID', '?')}, but {ckpt_root} does not "
            "exist: the run's checkpoints vanished (deleted, or the file system is not mounted on this node); "
            "refusing to start over from step 0. Restore the directory, or submit a new run to start fresh")


def exit_on_signals(checkpoint_on_usr1: bool = False) -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if checkpoint_on_usr1:
        signal.signal(signal.SIGUSR1, lambda signum, frame: stop_requested.set())
    else:
        signal.signal(signal.SIGUSR1, lambda signum, frame: sys.exit(128 + signum))
