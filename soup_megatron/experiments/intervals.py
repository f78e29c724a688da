"""Paired comparisons with intervals: a variant's step time against GRPO's over paired steps (bootstrap), and a
variant's result against the baseline's over paired seeds (Student's t).

Step s of every variant runs right after step s of GRPO, on the same prompts and seeds, so what slows the
machine for a while (another job, a frequency change) slows both sides of a pair. Over the measured steps S
the ratio is that of total times,

    R(S) = sum_{s in S} t_V(s) / sum_{s in S} t_GRPO(s),

and its interval the percentile bootstrap over steps: draw |S| steps with replacement (a pair stays
together), B times; the interval is the alpha/2 and 1 - alpha/2 quantiles of R over the draws.

A study's runs of one seed share the data order and the SFT start, so variant V and the baseline are compared
seed by seed: d_i = v_i - b_i over n seeds, mean d, s_d its sample std,

    t = mean(d) / (s_d / sqrt(n)),  n - 1 degrees of freedom,

p two-sided, p = I_{nu / (nu + t^2)}(nu / 2, 1 / 2) (the regularized incomplete beta), and the interval
mean(d) -/+ t_{1 - alpha/2, nu} s_d / sqrt(n).
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # mean over seeds of (variant - baseline)
    low: float
    high: float
    t: float
    p: float  # two-sided
    wins: int  # seeds where the variant is higher
    n: int

    def __str__(self) -> str:
        test = "no spread" if math.isnan(self.p) else f"t {self.t:.2f} p {self.p:.2f}"
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}] {test} ({self.wins}/{self.n})"


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = tiny, tiny, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            term = 1.0
        elif i % 2 == 0:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + term / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_two_sided_p(t: float, dof: int) -> float:
    return _betainc(dof / 2, 0.5, dof / (dof + t * t))


def t_quantile(confidence: float, dof: int) -> float:
    """t with P(|T| <= t) = confidence, by bisection (the p-value falls as t grows)."""
    low, high = 0.0, 1e4
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_p(mid, dof) > 1 - confidence else (low, mid)
    return (low + high) / 2


def paired_difference(base: list[float], other: list[float], confidence: float = 0.95) -> PairedDifference:
    """`other` against `base`, paired by position (by seed): mean difference, its t interval, t and p."""
    if len(base) != len(other):
        raise ValueError(f"paired seeds: {len(base)} baseline results against {len(other)}")
    if len(base) < 2:
        raise ValueError(f"a paired test needs at least 2 seeds, got {len(base)}")
    diffs = [o - b for b, o in zip(base, other)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    wins = sum(d > 0 for d in diffs)
    if sd == 0.0:  # every seed moved by the same amount: no spread to test against (t and p undefined)
        return PairedDifference(mean, mean, mean, math.nan if mean else 0.0, math.nan if mean else 1.0, wins, n)
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    t = mean / (sd / math.sqrt(n))
    return PairedDifference(mean, mean - half, mean + half, t, t_two_sided_p(t, n - 1), wins, n)
