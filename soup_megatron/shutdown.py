"""Signals that end a run. SIGTERM (scancel, kill) unwinds like Ctrl-C, so `finally` blocks close the
prefix worker, the SGLang servers and the logs. SIGUSR1 (Slurm's warning before the time limit) does
the same, except for training, where it asks the trainer to checkpoint at the end of the current step
and stop (`stop_requested`); the Slurm job script then requeues the job."""

from __future__ import annotations

import signal
import sys
import threading

stop_requested = threading.Event()


def exit_on_signals(checkpoint_on_usr1: bool = False) -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if checkpoint_on_usr1:
        signal.signal(signal.SIGUSR1, lambda signum, frame: stop_requested.set())
    else:
        signal.signal(signal.SIGUSR1, lambda signum, frame: sys.exit(128 + signum))
