"""Per-segment analysis quantities (ratio, clip fraction, entropy) the spec asks the trainer to log."""

from __future__ import annotations

import torch

from ..sample import SEGMENT_NAMES


def segment_stats(segment: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor,
                  entropy: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for tag, name in SEGMENT_NAMES.items():
        sel = segment == tag
        n = int(sel.sum())
        out[f"{name}/tokens"] = float(n)
        if n == 0:
            continue
        r = ratio[sel]
        out[f"{name}/ratio_mean"] = float(r.mean())
        out[f"{name}/ratio_max"] = float(r.max())
        out[f"{name}/ratio_min"] = float(r.min())
        out[f"{name}/clip_frac"] = float(clipped[sel].float().mean())
        out[f"{name}/entropy"] = float(entropy[sel].mean())
    return out


def mean_over_updates(per_update: list[dict[str, float]]) -> dict[str, float]:
    """Average each key over the optimizer updates of a step (max/min keys take the extreme)."""
    keys = {k for d in per_update for k in d}
    out = {}
    for k in keys:
        values = [d[k] for d in per_update if k in d]
        if k.endswith("_max"):
            out[k] = max(values)
        elif k.endswith("_min"):
            out[k] = min(values)
        else:
            out[k] = sum(values) / len(values)
    return out
