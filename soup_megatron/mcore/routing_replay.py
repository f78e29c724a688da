"""Routing replay in the megatron actor, on megatron-core's own hook for it.

With `TransformerConfig.moe_enable_routing_replay` every MoE layer's router holds a `RouterReplay` that its
top-k selection goes through. Here each one is given, per micro-batch, the experts of this rank's tokens
(the routing of model/routing.py, int16 [rows, positions, layers, k], NOT_GIVEN = -1 where the router
chooses) and its selection becomes: the router's own top-k, recorded; the given experts where given. The
weights are then the router's scores of those experts, as megatron computes them for its own choice (the
softmax over the chosen logits with pre_softmax=False: the renormalised probabilities), so the router still
learns. A rank holds the layers of its pipeline stage (each model chunk its own) and, of a micro-batch, its
context-parallel positions, of which a MoE layer sees under sequence parallelism its tensor-parallel rank's
contiguous share; megatron flattens them sequence-major, [positions x rows, k].

Full recomputation in the backward pass is refused with replay (a recomputed layer would replay whichever
micro-batch was given last); selective recomputation re-runs core attention only, not the routers.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..model.routing import NOT_GIVEN
from .parallel import Layout, SequenceSlice


def _given_where_set(replay, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
    """RouterReplay.get_replay_topk as this actor uses it: record the router's own top-k, use the target
    experts where they are set (>= 0), and the scores of the experts used."""
    values, natural = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
    replay.record_indices(natural)
    given = replay.target_topk_idx
    if given is None:
        return values, natural
    given = given.to(scores.device)
    experts = torch.where(given >= 0, given, natural)
    return scores.gather(1, experts), experts


class MegatronRouting:
    """The RouterReplay of every MoE layer of this rank's model chunks, by chunk, with its global layer."""

    def __init__(self, chunks: list, layout: Layout, sequence_parallel: bool, top_k: int):
        self.layout, self.sequence_parallel, self.top_k = layout, sequence_parallel, top_k
        self.layers: list[list[tuple[int, object]]] = []
        for chunk in chunks:
            mine = []
            for layer in chunk.decoder.layers:
                replay = layer.mlp.router.router_replay
                replay.get_replay_topk = functools.partial(_given_where_set, replay)
                mine.append((layer.layer_number - 1, replay))
            self.layers.append(mine)

    def positions(self, part: SequenceSlice) -> torch.Tensor:
        """The positions of a micro-batch this rank's MoE layers route: its context-parallel ones, and of those
        under sequence parallelism its tensor-parallel rank's contiguous share."""
        if not self.sequence_parallel or self.layout.tp == 1:
            return part.index
        return part.index.chunk(self.layout.tp)[self.layout.tp_rank]

    def give(self, chunk: int, routing: Optional[torch.Tensor], part: SequenceSlice) -> None:
        """Before chunk `chunk`'s forward pass of a micro-batch: its routing [rows, <= padded, layers, k]
        (or None: every router chooses)."""
        local = None if routing is None else _at(routing, part.padded, self.positions(part))
        for layer, replay in self.layers[chunk]:
            replay.clear_indices()
            if local is not None:  # [rows, positions, k] -> megatron's order, positions major
                replay.target_topk_idx = local[:, :, layer].transpose(0, 1).reshape(-1, self.top_k).long()

    def taken(self, chunk: int, rows: int, part: SequenceSlice, layers: int) -> torch.Tensor:
        """After chunk `chunk`'s forward pass: what its routers chose, as int16 [rows, padded, layers, k] with
        this rank's positions and layers filled and zeros elsewhere (summed over the ranks later)."""
        positions = self.positions(part)
        out = torch.zeros(rows, part.padded, layers, self.top_k, dtype=torch.int16)
        for layer, chosen in self._chosen(chunk, rows, len(positions)):
            out[:, positions.cpu(), layer] = chosen.to(torch.int16).cpu()
        return out

    def _chosen(self, chunk: int, rows: int, positions: int):
        """(global layer, the experts its router chose in the last forward pass as [rows, positions, k]) for
        each MoE layer of chunk `chunk` (megatron records them positions-major)."""
        for layer, replay in self.layers[chunk]:
            yield layer, replay.get_recorded_indices().reshape(positions, rows, self.top_k).transpose(0, 1)

    def count(self, chunk: int, attention_mask: torch.Tensor, part: SequenceSlice, counts: torch.Tensor) -> None:
        """After chunk `chunk`'s forward pass: add to `counts` [layers, experts] the token slots its routers
        gave each expert at the micro-batch's real tokens (`attention_mask` [rows, <= padded])."""
        positions = self.positions(part)
        mask = torch.nn.functional.pad(attention_mask, (0, part.padded - attention_mask.shape[1]))[:, positions] > 0
        for layer, chosen in self._chosen(chunk, mask.shape[0], len(positions)):
            counts[layer] += torch.bincount(chosen[mask.to(chosen.device)].flatten().cpu(),
                                            minlength=counts.shape[1])


def _at(routing: torch.Tensor, padded: int, positions: torch.Tensor) -> torch.Tensor:
    """`routing`'s columns `positions` after padding it with NOT_GIVEN to `padded` positions."""
    full = routing.new_full((routing.shape[0], padded, *routing.shape[2:]), NOT_GIVEN)
    width = min(routing.shape[1], padded)
    full[:, :width] = routing[:, :width]
    return full[:, positions]
