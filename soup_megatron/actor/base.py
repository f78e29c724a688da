"""The actor protocol: the trained policy, whatever holds it (local PyTorch model, megatron-core).

Tensors are laid out per sample as `prompt + response`, right-padded. Per-token fields have one
column fewer than `input_ids`: column j describes target token j + 1 (predicted from tokens <= j).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping, Optional, Protocol

import torch

from ..algo.loss import LossConfig, LossScale


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    segment: torch.Tensor  # [N, T-1]  PROMPT (also padding) / PREFIX / CONTINUATION of each target
    behaviour_logp: torch.Tensor  # [N, T-1] log-prob under the policy that wrote the token
    versions: torch.Tensor  # [N, T-1] policy version that wrote the token (-1 for prompt / padding)
    advantages: torch.Tensor  # [N]
    old_logp: Optional[torch.Tensor] = None  # [N, T-1] pi_old, filled by the actor before the update
    ref_logp: Optional[torch.Tensor] = None  # [N, T-1] reference policy, when a KL term is used

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> "TokenBatch":
        picked = {f.name: (getattr(self, f.name)[rows] if getattr(self, f.name) is not None else None)
                  for f in fields(self)}
        return trim(TokenBatch(**picked))


def trim(batch: TokenBatch) -> TokenBatch:
    """Drop padding columns that no row of this batch uses."""
    width = int(batch.attention_mask.sum(-1).max())
    if width == batch.input_ids.shape[1]:
        return batch
    cut = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if value is not None and value.dim() == 2:
            cut[f.name] = value[:, : width if value.shape[1] == batch.input_ids.shape[1] else width - 1]
    return replace(batch, **cut)


class Actor(Protocol):
    version: int  # number of optimizer updates applied to the policy's weights (= trainer steps taken)

    def logprobs(self, batch: TokenBatch, temperature: float, with_entropy: bool = False
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[N, T-1] log-probs of every target token under the current weights (no gradient)."""

    def rows_per_update(self, rows: int) -> int:
        """The fewest rows >= `rows` one optimizer update can be split into (over data-parallel ranks and
        pipeline microbatches); the trainer fills up with rows whose loss is zero."""

    def train_minibatch(self, batch: TokenBatch, loss_cfg: LossConfig, temperature: float,
                        scale: LossScale | None = None) -> dict:
        """One optimizer update on `batch` with the SOUP loss, its weights dividing by `scale` (default: the
        counts of `batch` itself); returns loss, grad norm and per-token stats."""

    def rollout_weights(self) -> Mapping[str, torch.Tensor]:
        """Full HF-named weights for the rollout engines (a copy they may keep)."""

    def save_hf(self, path: Path) -> None:
        """An HF checkpoint directory of the current weights (config, safetensors, tokenizer)."""

    def save_state(self, path: Path) -> None:
        """Everything to resume training: weights, optimizer state."""

    def load_state(self, path: Path) -> None: ...

    def close(self) -> None:
        """Release what the actor holds beyond this process (the megatron actor's follower ranks)."""
