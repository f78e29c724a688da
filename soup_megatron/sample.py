"""What flows through a SOUP step, with per-token provenance.

Every response token carries its behaviour log-prob (from the policy that wrote it), the version of
that policy, and a segment tag. A mixed sample is `prompt | prefix (historical) | continuation
(on-policy)`; an on-policy sample has an empty prefix (cut = 0); a trajectory-mixed sample is all
prefix. Version -1 is never used for response tokens; the initial policy is version 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .data.prompt import Prompt

PROMPT, PREFIX, CONTINUATION = 0, 1, 2
SEGMENT_NAMES = {PREFIX: "prefix", CONTINUATION: "continuation"}


@dataclass
class Trajectory:
    """A complete response to one prompt written by one policy, as stored for prefixes and replay."""

    prompt_uid: str
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finished: bool  # ended with EOS (the EOS is the last token)

    def __post_init__(self):
        if not (len(self.token_ids) == len(self.logprobs) == len(self.versions)):
            raise ValueError("trajectory token_ids, logprobs and versions must have the same length")


@dataclass
class Sample:
    prompt: Prompt
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    behaviour_logp: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    finish_reason: str = ""
    mixed: bool = False
    cut: int = 0  # number of prefix tokens
    reward: float = 0.0
    advantage: float = 0.0
    # a MoE policy's experts per position of prompt + response but the last, as the rollout engine chose them
    # (int16 [positions, layers, k]; actor.routing_replay=rollout): None when no engine computed them
    routing: Optional[torch.Tensor] = None

    def response_trajectory(self) -> Trajectory:
        return Trajectory(self.prompt.uid, list(self.response_ids), list(self.behaviour_logp),
                          list(self.versions), self.finish_reason == "stop")
