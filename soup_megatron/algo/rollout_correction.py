"""Rollout correction: the trainer's pi_old against the rollout engine's log-probs of the tokens it wrote.

The engine that samples continuations (SGLang, or the in-process engine) computes its own log-probs
mu_t, which differ from the trainer's pi_old_t by kernels, precision and batching (the `logp_gap`
metric). The PPO ratio r_t = pi_theta / pi_old assumes pi_old wrote the token; these weights correct
for mu having written it. Per continuation token t of sample i, with w_t = pi_old_t / mu_t:

    level = token       W_t = w_t
    level = sequence    W_t = prod_{s in continuation of i} w_s          (the same for every token of i)

    tis   c_t = min(W_t, cap)                 truncated importance weight
    mis   c_t = 1 if 1/cap <= W_t <= cap      masked importance sampling: tokens (or whole sequences)
            0 otherwise                       whose weight leaves the band get no policy gradient

The per-token policy loss of a continuation token becomes c_t * l_t (c_t is a constant: pi_old and mu
are fixed during the update). A masked token stays in the aggregation counts, like a clipped one, so
the loss keeps its scale whatever the band drops.

SOUP's prefix tokens were written by a historical checkpoint served by the history engine, so mu there
is pi_h as that engine computed it, and every `prefix_mode` already judges them against it: `clip` and
`shaped` take r_t = pi_theta / pi_h from those log-probs, `decoupled` weights them by
min(pi_old / pi_h, is_cap), `mask` does not train them. A second correction would count that twice, so
c_t = 1 on prefix tokens, and the sequence weight multiplies continuation tokens only.
"""

from __future__ import annotations

import torch

from ..sample import CONTINUATION

MODES = ("none", "tis", "mis")
LEVELS = ("token", "sequence")


def rollout_correction(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, segment: torch.Tensor, mode: str,
                       level: str = "token", cap: float = 2.0) -> torch.Tensor:
    """[N, T] weights c_t (1.0 off the continuation and with mode none). Inputs are [N, T] log-probs and
    segment tags."""
    if mode not in MODES or level not in LEVELS:
        raise ValueError(f"rollout correction mode must be one of {MODES} and level one of {LEVELS}, "
                         f"got {mode!r} / {level!r}")
    ones = torch.ones_like(old_logp)
    if mode == "none":
        return ones
    cont = segment == CONTINUATION
    log_w = torch.where(cont, old_logp - behaviour_logp, torch.zeros_like(old_logp))
    if level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    log_cap = torch.log(torch.tensor(cap, dtype=old_logp.dtype))
    if mode == "tis":
        weight = torch.exp(log_w.clamp(max=log_cap))  # clamped in log space: a long sequence cannot overflow
    else:
        weight = ((log_w >= -log_cap) & (log_w <= log_cap)).to(old_logp.dtype)
    return torch.where(cont, weight, ones)


def correction_stats(weights: torch.Tensor, segment: torch.Tensor, mode: str) -> dict[str, float]:
    """What the correction did to the continuation tokens: mean weight, and the share truncated (tis) or
    masked (mis)."""
    cont = segment == CONTINUATION
    if mode == "none" or not cont.any():
        return {}
    w = weights[cont]
    out = {"rollout_correction/weight_mean": float(w.mean())}
    if mode == "mis":
        out["rollout_correction/masked_frac"] = float((w == 0).float().mean())
    return out
