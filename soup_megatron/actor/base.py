"""The actor protocol: the trained policy, whatever holds it (local PyTorch model, megatron-core).

Tensors are laid out per sample as `prompt + response`, right-padded. Per-token fields have one
column fewer than `input_ids`: column j describes target token j + 1 (predicted from tokens <= j).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping, Optional, Protocol, Sequence

import torch

from ..algo.loss import LossConfig, LossScale
from ..sample import PROMPT


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
    correction: Optional[torch.Tensor] = None  # [N, T-1] rollout correction weights c_t (algo.rollout_correction)
    # [N, T-1, layers, k] int16: the experts a MoE layer uses at each input position in the update (routing
    # replay, model/routing.py); NOT_GIVEN (-1) where the router chooses; None = every router chooses
    routing: Optional[torch.Tensor] = None

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
        if value is not None and value.dim() >= 2:
            cut[f.name] = value[:, : width if value.shape[1] == batch.input_ids.shape[1] else width - 1]
    return replace(batch, **cut)


# what `train_minibatch` returns per token (flat), beside the segment tags: the loss's per-token stats (loss.py)
# and the entropy; the flags travel as 0/1 floats between ranks
PER_TOKEN_STATS = ("ratio", "clipped", "ratio_out", "entropy")
PER_TOKEN_FLAGS = ("clipped", "ratio_out")


def per_token_stats(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[N, T-1] per-token stats as the flat tensors `train_minibatch` returns, flags as booleans."""
    return {k: v.flatten() > 0 if k in PER_TOKEN_FLAGS else v.flatten() for k, v in stats.items()}


def with_filler_rows(batch: TokenBatch, count: int) -> TokenBatch:
    """`batch` and `count` copies of its first row with no trained token (segment PROMPT throughout): they
    add no loss and no count, and make up a row count an actor can split over its ranks when the update has
    too few rows of its own (dynamic sampling short of groups)."""
    if count <= 0:
        return batch
    first = torch.zeros(count, dtype=torch.long)
    parts = {f.name: None if v is None else torch.cat([v, v[first]])
             for f in fields(batch) for v in [getattr(batch, f.name)]}
    parts["segment"][len(batch):] = PROMPT
    return TokenBatch(**parts)


def plan_micro_batches(lengths: Sequence[int], max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Rows (indices into `lengths`) of each micro-batch. A micro-batch is padded to its longest row, so it
    costs rows x longest tokens. max_tokens = 0: consecutive runs of at most `max_rows` rows, as even as
    possible. max_tokens > 0: rows sorted longest first and packed greedily while rows x longest <= max_tokens
    (and rows <= max_rows), so rows of like length share a micro-batch; a row longer than the budget goes
    alone. Which rows share a micro-batch changes no loss: weights carry the update's global counts."""
    n = len(lengths)
    if not n:
        return []
    if max_tokens <= 0:
        count = -(-n // max_rows)
        return [chunk.tolist() for chunk in torch.tensor_split(torch.arange(n), count)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    plans, current = [], []
    for i in order:  # longest first: a micro-batch's first row is its longest
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * lengths[current[0]] > max_tokens):
            plans.append(current)
            current = []
        current.append(i)
    plans.append(current)
    return plans


def padding_share(lengths: Sequence[int], plans: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(padding tokens, computed tokens) of micro-batches `plans` over rows of `lengths`."""
    computed = sum(len(rows) * max(lengths[i] for i in rows) for rows in plans if rows)
    return computed - sum(lengths[i] for rows in plans for i in rows), computed


class Actor(Protocol):
    version: int  # number of optimizer updates applied to the policy's weights (= trainer steps taken)
    places: list[dict]  # each rank's host and layout ranks, in rank order (one entry for a single process)

    def logprobs(self, batch: TokenBatch, temperature: float, with_entropy: bool = False, with_routing: bool = False
                 ) -> tuple:
        """[N, T-1] log-probs of every target token under the current weights (no gradient), the entropy
        with `with_entropy`, routing `batch.routing` where given; with `with_routing` a MoE model's natural
        routing [N, T-1, layers, k] too (what its routers chose, replayed or not), as a third element."""

    def rows_per_update(self, rows: int) -> int:
        """The fewest rows >= `rows` one optimizer update can be split into (over data-parallel ranks and
        pipeline microbatches); the trainer fills up with rows whose loss is zero."""

    def train_minibatch(self, batch: TokenBatch, loss_cfg: LossConfig, temperature: float,
                        scale: LossScale | None = None) -> dict:
        """One optimizer update on `batch` with the SOUP loss, its weights dividing by `scale` (default: the
        counts of `batch` itself); returns loss, grad norm and per-token stats."""

    def step_stats(self) -> dict[str, float]:
        """What the actor did beyond its results since the last call (the megatron driver: bytes sent to
        its followers), for the step's metrics."""

    def rollout_weights(self) -> Mapping[str, torch.Tensor]:
        """Full HF-named weights for the rollout engines (a copy they may keep)."""

    def save_hf(self, path: Path) -> None:
        """An HF checkpoint directory of the current weights (config, safetensors, tokenizer)."""

    def save_state(self, path: Path) -> None:
        """Everything to resume training: weights, optimizer state."""

    def load_state(self, path: Path) -> None: ...

    def close(self) -> None:
        """Release what the actor holds beyond this process (the megatron actor's follower ranks)."""
