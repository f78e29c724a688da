"""Dynamic sampling (DAPO's group filter): a group whose rewards are all equal has advantage 0 for every
sample, so it carries no policy gradient; with `algo.dynamic_sampling` the trainer drops such groups and
samples more prompts in refill rounds until the step has `rollout.prompts_per_step` informative groups
(or `algo.dynamic_sampling_max_rounds` refills are spent)."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[num_groups] True where a group's rewards are not all equal; `rewards` is [num_groups * group_size],
    each group contiguous."""
    r = rewards.view(-1, group_size)
    return (r != r[:, :1]).any(dim=1)


def refill_prompts(pool: Sequence[T], count: int, seed: int) -> list[T]:
    """`count` distinct prompts drawn from `pool` with their own seed (a pure function of it, so a resumed
    run draws the same refills)."""
    return random.Random(seed).sample(list(pool), min(count, len(pool)))
