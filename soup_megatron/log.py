"""Logging: status and warnings go through `logging` under the `soup_megatron` logger, to stderr, from
global rank 0 only (megatron follower ranks and torchrun workers would repeat every line); errors are
shown from every rank. Tables, the progress bar and a command's requested output are printed."""

from __future__ import annotations

import logging
import os
import sys

ROOT = "soup_megatron"


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (pass __name__)."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def global_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


class RankZero(logging.Filter):
    """Lets a record through on global rank 0, and errors on every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or global_rank() == 0


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tests and tools swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """One stderr handler on the package logger (idempotent): bare message lines, like the prints they replace."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankZero())
        logger.addHandler(handler)
        logger.propagate = False
