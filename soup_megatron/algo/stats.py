"""Per-segment analysis quantities (ratio, clipping, entropy) the spec asks the trainer to log."""

from __future__ import annotations

import torch

from ..sample import SEGMENT_NAMES


def segment_stats(segment: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor, ratio_out: torch.Tensor,
                  entropy: torch.Tensor, advantage_weight: torch.Tensor) -> dict[str, float]:
    """Per segment (prefix, continuation) of one update's tokens; every argument is per token, flat (loss.py's
    per-token stats, `advantage_weight` = |A_t| w_t from `loss.advantage_weights`):

        tokens          the segment's tokens
        ratio_mean/max/min   r_t, the ratio each token is judged by (loss.py)
        clip_frac       share of tokens whose min() took the clipped branch: they get no policy gradient
        ratio_out_frac  share of tokens with r_t outside their clip range [1 - lo, 1 + hi], whichever branch the
                        min() took (the unclipped one where clipping would raise the objective)
        clip_adv_mass   sum_{t clipped} |A_t| w_t / sum_t |A_t| w_t: the advantage-weighted share of the segment's
                        policy gradient lost to clipping (w_t the aggregation weight); absent where the sum is 0
        entropy         mean of H(pi_theta(. | tokens before t)) at rollout.temperature. For `continuation` this is
                        the effective entropy, the policy's entropy on its own samples (the rollout engine wrote them
                        with its weights, at most rollout.async_steps versions older; pi_theta = pi_old in a step's
                        first update); for `prefix` the same policy's entropy along the historical policy's tokens
    """
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
        out[f"{name}/ratio_out_frac"] = float(ratio_out[sel].float().mean())
        mass = advantage_weight[sel]
        if mass.sum() > 0:
            out[f"{name}/clip_adv_mass"] = float(mass[clipped[sel]].sum() / mass.sum())
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
