"""What every stage of a training step shares: its reproducible random streams and its clock."""

from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field


def step_seed(seed: int, step: int, stream: str) -> int:
    """An independent, reproducible random stream per (seed, step, purpose)."""
    return zlib.crc32(f"{seed}-{step}-{stream}".encode())


@dataclass
class Timer:
    """Seconds per named stage of one step (`time/<name>` in its metrics record)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
