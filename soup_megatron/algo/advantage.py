"""Group-relative advantages over the whole group, mixed and on-policy samples together (spec step 8).

    A_i = (R_i - mean_j R_j) / (std_j R_j + eps)      adv_norm = std
    A_i =  R_i - mean_j R_j                           adv_norm = none (Dr.GRPO)

std is the population standard deviation of the group's rewards.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, adv_norm: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """`rewards` is [num_groups * group_size] with each group contiguous."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if adv_norm == "std":
        centred = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif adv_norm != "none":
        raise ValueError(f"adv_norm must be 'std' or 'none', got {adv_norm!r}")
    return centred.view(-1)
