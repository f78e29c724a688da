"""Overlong responses (DAPO): a soft length penalty on the reward, and a filter that trains nothing on
responses the length limit cut.

Soft overlong punishment, with L_max = rollout.max_response_len, L_c = algo.overlong_penalty_len and the
response length |y| (prefix and continuation: the whole response the reward judges):

    R_len(y) = 0                               |y| <= L_max - L_c
             = (L_max - L_c - |y|) / L_c       L_max - L_c < |y| <= L_max
             = -1                              |y| > L_max
    R'(y) = R(y) + factor * R_len(y)

Overlong filter: a response that ended because it hit L_max (finish reason `length`, no EOS) gets no
loss; its reward still enters its group's advantage baseline.
"""

from __future__ import annotations


def overlong_penalty(length: int, max_len: int, penalty_len: int, factor: float) -> float:
    """factor * R_len for a response of `length` tokens (0 with penalty_len = 0: off)."""
    if penalty_len <= 0:
        return 0.0
    free = max_len - penalty_len
    if length <= free:
        return 0.0
    if length > max_len:
        return -factor
    return factor * (free - length) / penalty_len
