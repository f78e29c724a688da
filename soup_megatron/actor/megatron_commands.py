"""What the megatron driver (global rank 0) tells its follower ranks: a typed command set, and each
data-parallel rank's rows of a batch as tensors.

Per call the driver broadcasts a small `Header` (the command, and the shape of every data-parallel
rank's rows), then sends every other rank only the rows of its data-parallel rank (rows dp_rank,
dp_rank + dp, ...), trimmed to their own longest row, point to point. A follower never sees the rest
of the batch, so the bytes sent per step grow with the batch once, not once per rank.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..algo.loss import LossConfig, LossScale
from .base import TokenBatch, trim


@dataclass(frozen=True)
class LogProbs:
    temperature: float
    with_entropy: bool
    with_routing: bool = False


@dataclass(frozen=True)
class TrainMinibatch:
    loss_cfg: LossConfig
    temperature: float
    scale: LossScale  # the whole update's counts (the loss weights divide by them on every rank)


@dataclass(frozen=True)
class RolloutWeights:
    pass


@dataclass(frozen=True)
class SaveHF:
    path: Path


@dataclass(frozen=True)
class SaveState:
    path: Path
    version: int


@dataclass(frozen=True)
class LoadState:
    path: Path


@dataclass(frozen=True)
class Close:
    pass


Command = Union[LogProbs, TrainMinibatch, RolloutWeights, SaveHF, SaveState, LoadState, Close]


@dataclass
class RankRows:
    """One data-parallel rank's rows of a batch: `batch` holds rows `index` of a batch of `total` rows and
    `width` columns (trimmed to its own longest row)."""

    index: torch.Tensor
    batch: TokenBatch
    total: int
    width: int

    @classmethod
    def of(cls, batch: TokenBatch, dp_rank: int, dp: int) -> "RankRows":
        index = torch.arange(dp_rank, len(batch), dp)
        picked = trim(select_rows(batch, index)) if len(index) else select_rows(batch, index)
        return cls(index, picked, len(batch), batch.input_ids.shape[1])


def select_rows(batch: TokenBatch, rows: torch.Tensor) -> TokenBatch:
    return TokenBatch(**{f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name)[rows]
                         for f in fields(batch)})


@dataclass(frozen=True)
class Header:
    """Broadcast before every command; `slices` is empty for commands without a batch."""

    command: Command
    total: int = 0
    width: int = 0
    slices: tuple[tuple[int, int], ...] = ()  # per data-parallel rank: (rows, trimmed width)
    # present TokenBatch fields: (name, dtype, columns less than width or -1 for one per row, trailing dimensions)
    tensors: tuple[tuple[str, str, int, tuple[int, ...]], ...] = ()


def _specs(batch: TokenBatch) -> tuple[tuple[str, str, int, tuple[int, ...]], ...]:
    out = []
    for f in fields(batch):
        value = getattr(batch, f.name)
        if value is not None:
            short = -1 if value.dim() == 1 else batch.input_ids.shape[1] - value.shape[1]
            out.append((f.name, str(value.dtype).removeprefix("torch."), short, tuple(value.shape[2:])))
    return tuple(out)


class CommandChannel:
    """The driver's side (`send`) and a follower's (`receive`) of the command stream, counting the bytes the
    driver sends."""

    def __init__(self, dp_rank: int, dp: int, device: torch.device):
        self.dp_rank, self.dp, self.device = dp_rank, dp, device
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.dp_ranks = [dp_rank]  # every global rank's data-parallel rank
        if self.world > 1:
            self.dp_ranks = [0] * self.world
            dist.all_gather_object(self.dp_ranks, dp_rank)
        self.sent_bytes = 0  # since the last `take_counts`
        self.whole_batch_bytes = 0  # what broadcasting the whole call to every rank would have sent

    def send(self, command: Command, batch: Optional[TokenBatch] = None) -> Optional[RankRows]:
        """Driver: tell every rank to run `command`; returns the driver's own rows."""
        if batch is None:
            header = Header(command)
            parts: list[RankRows] = []
        else:
            parts = [RankRows.of(batch, r, self.dp) for r in range(self.dp)]
            header = Header(command, len(batch), batch.input_ids.shape[1],
                            tuple((len(p.index), p.batch.input_ids.shape[1]) for p in parts), _specs(batch))
        if self.world > 1:
            followers = self.world - 1
            self.whole_batch_bytes += len(pickle.dumps((command, batch))) * followers
            self.sent_bytes += len(pickle.dumps(header)) * followers
            dist.broadcast_object_list([header], src=0)
            for rank in range(1, self.world):
                part = parts[self.dp_ranks[rank]] if parts else None
                if part is not None and len(part.index):
                    for name, *_ in header.tensors:
                        tensor = getattr(part.batch, name).contiguous().to(self.device)
                        dist.send(tensor, dst=rank)
                        self.sent_bytes += tensor.numel() * tensor.element_size()
        return parts[0] if parts else None

    def receive(self) -> tuple[Command, Optional[RankRows]]:
        """Follower: the next command and this rank's rows (None for commands without a batch)."""
        message = [None]
        dist.broadcast_object_list(message, src=0)
        header: Header = message[0]
        if not header.slices:
            return header.command, None
        rows, width = header.slices[self.dp_rank]
        tensors = {}
        for name, dtype, short, trailing in header.tensors:
            shape = (rows,) if short < 0 else (rows, width - short, *trailing)
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            if rows:
                dist.recv(tensor, src=0)
            tensors[name] = tensor.cpu()
        batch = TokenBatch(**{f.name: tensors.get(f.name) for f in fields(TokenBatch)})
        return header.command, RankRows(torch.arange(self.dp_rank, header.total, self.dp), batch, header.total,
                                        header.width)

    def take_counts(self) -> dict[str, float]:
        counts = {"megatron/bytes_sent": float(self.sent_bytes),
                  "megatron/bytes_whole_batch_broadcast": float(self.whole_batch_bytes)}
        self.sent_bytes = self.whole_batch_bytes = 0
        return counts
