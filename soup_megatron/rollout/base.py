"""The rollout-engine protocol: what the trainer and the prefix cache ask of any generation backend.

An engine holds one policy version at a time. It continues `prompt + prefix` on-policy (the prefix
is prefilled, never decoded), reporting each new token's log-prob under the sampling distribution,
the finish reason and the version that produced it; it scores given tokens; and it loads weights for
a new version, either from an HF checkpoint directory or (in-process engines) from a state dict.
The in-process `transformers` engine implements it here; an SGLang client implements the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Protocol, Sequence

import torch

WeightSource = Path | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token generated, and included: any EOS id the checkpoint names) | "length"
    version: int
    # with routing returned (a MoE model): int16 [context + new tokens - 1, layers, k], the experts each layer
    # chose for every position the engine computed (model/routing.py)
    routing: Optional[torch.Tensor] = None


class RolloutEngine(Protocol):
    version: int

    def generate(self, requests: Sequence[GenerationRequest], temperature: float, seed: int) -> list[Generation]:
        """Continue each request; temperature 0 is greedy. Same seed and weights give the same tokens."""

    def score(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
              temperature: float) -> list[list[float]]:
        """Log-prob of each target token given its context and the targets before it."""

    def load_weights(self, source: WeightSource, version: int) -> None:
        """Serve `version` from now on; a bad source raises and keeps the old weights."""

    def stats(self) -> dict[str, float]:
        """Counters of the last `generate` (SGLang: its input tokens and those its radix cache held)."""

    def close(self) -> None: ...
