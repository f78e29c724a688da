"""Where a mixed sample switches from the historical policy to the current one.

Cut point (spec step 5): k = floor(lambda * L), lambda ~ U[cut_min, cut_max], never past the
historical EOS (the EOS token never enters a prefix). L is the historical trajectory's length L_hist
(`soup.cut_of = history`) or the response budget `rollout.max_response_len` (`max_length`: then no
cut lies past cut_max * max_response_len, so the history needs no longer trajectories). `cut_at = line`
snaps k back to the nearest position right after a newline, so the prefix ends at a reasoning-step
boundary (k = 0 when the trajectory has no newline before k). Trajectory-level mixing
(`soup.mode = trajectory`) takes the whole trajectory, k = L_hist, EOS included.
"""

from __future__ import annotations

import math
import random
from typing import Sequence


def mixed_count(group_size: int, mix_fraction: float) -> int:
    """How many of a group's samples are mixed (rounded to the nearest whole sample)."""
    return int(math.floor(group_size * mix_fraction + 0.5))


def history_length(max_response_len: int, cut_max: float, cut_of: str) -> int:
    """Tokens a historical trajectory needs: all of the response budget, or with cut_of=max_length only up
    to the furthest possible cut."""
    return max_response_len if cut_of == "history" else max(1, int(math.floor(cut_max * max_response_len)))


def cut_point(
    token_ids: Sequence[int],
    finished: bool,
    rng: random.Random,
    cut_min: float,
    cut_max: float,
    cut_at: str,
    newline_ids: frozenset[int],
    length: int | None = None,
) -> int:
    """k for one mixed sample; `length` is L with cut_of=max_length (None: the trajectory's own length)."""
    usable = len(token_ids) - 1 if finished else len(token_ids)  # never cut past the EOS
    lam = rng.uniform(cut_min, cut_max)
    k = min(int(math.floor(lam * (len(token_ids) if length is None else length))), usable)
    if cut_at == "line":
        while k > 0 and token_ids[k - 1] not in newline_ids:
            k -= 1
    return k
