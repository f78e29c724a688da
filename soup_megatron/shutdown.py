"""Signals that end a run: SIGTERM (scancel, kill) and SIGUSR1 (Slurm's warning before the time limit)
unwind like Ctrl-C, so `finally` blocks close the prefix worker, the SGLang servers and the logs."""

from __future__ import annotations

import signal
import sys


def exit_on_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
