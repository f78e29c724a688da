"""A variant's step time against GRPO's over paired steps, with a bootstrap interval.

Step s of every variant runs right after step s of GRPO, on the same prompts and seeds, so what slows the
machine for a while (another job, a frequency change) slows both sides of a pair. Over the measured steps S
the ratio is that of total times,

    R(S) = sum_{s in S} t_V(s) / sum_{s in S} t_GRPO(s),

and its interval the percentile bootstrap over steps: draw |S| steps with replacement (a pair stays
together), B times; the interval is the alpha/2 and 1 - alpha/2 quantiles of R over the draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_PAIRED_STEPS = 3  # fewer pairs give a bootstrap of a handful of distinct values: no interval


@dataclass(frozen=True)
class PairedRatio:
    point: float
    low: float
    high: float
    steps: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return f"{self.point:.3f} [{self.low:.3f}, {self.high:.3f}]"


def paired_ratio(base: list[float], other: list[float], confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> PairedRatio:
    """R = sum(other) / sum(base) over paired steps, with its percentile-bootstrap interval (seeded: the same
    steps give the same interval)."""
    if len(base) != len(other):
        raise ValueError(f"paired steps: {len(base)} base steps against {len(other)}")
    if len(base) < MIN_PAIRED_STEPS:
        raise ValueError(f"an interval needs at least {MIN_PAIRED_STEPS} paired steps, got {len(base)}")
    b = torch.tensor(base, dtype=torch.float64)
    o = torch.tensor(other, dtype=torch.float64)
    draws = torch.randint(len(b), (resamples, len(b)), generator=torch.Generator().manual_seed(seed))
    ratios = o[draws].sum(1) / b[draws].sum(1)
    alpha = 1 - confidence
    low, high = torch.quantile(ratios, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return PairedRatio(float(o.sum() / b.sum()), low, high, len(b))
