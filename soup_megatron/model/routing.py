"""Expert routing of a transformers mixture-of-experts model (Qwen3-MoE), recorded and replayed.

Each MoE layer's router scores the experts of token t, p_t = softmax(W_r h_t), keeps the top k and weighs
their outputs by w_{t,i} = p_t(e_i), renormalised to sum to 1 over the k with norm_topk_prob. Recording keeps
the experts e_1..e_k each layer chose. Replaying makes the layer use given experts instead, weighted by the
current router's probabilities of those experts (the same formula), so the router still gets gradients
through w while the experts, a discrete choice, stay those given (routing replay: R2 replays the trainer's own
recorded choice, R3 the rollout engine's).

Routing tensors are int16 [rows, positions, layers, k]: the experts of each input position (the last
position of a row, which predicts nothing, is not needed), -1 where none is given (the router chooses).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

NOT_GIVEN = -1


def is_moe_checkpoint(path) -> bool:
    """Whether the HF checkpoint at `path` is a mixture-of-experts model (its config names experts)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))


def checkpoint_routing_shape(path) -> tuple[int, int]:
    """(layers, experts per token) of the MoE checkpoint at `path` (every layer a MoE layer)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return config.num_hidden_layers, config.num_experts_per_tok


def expert_layers(model) -> list:
    """The router of every MoE layer of an HF causal LM, in layer order ([] for a dense model)."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def routing_shape(model) -> Optional[tuple[int, int]]:
    """(layers, experts per token) of a MoE model, None for a dense one."""
    routers = expert_layers(model)
    return (len(routers), routers[0].top_k) if routers else None


class RoutingTap:
    """Forward hooks on every router of `model`: with `record`, each forward's natural choices (what the
    routers chose, whatever was replayed) are kept for `take`; inside `replaying(given)`, the routers use the
    experts `given` for the positions that have them."""

    def __init__(self, model, record: bool = True):
        self.routers = expert_layers(model)
        if not self.routers:
            raise ValueError("routing replay needs a mixture-of-experts model; this one is dense")
        self.record = record
        self._recorded: list[torch.Tensor] = []
        self._given: Optional[torch.Tensor] = None
        self._handles = [router.register_forward_hook(self._hook(layer)) for layer, router in enumerate(self.routers)]

    def _hook(self, layer: int):
        def hook(router, inputs, output):
            logits, scores, experts = output
            if self.record:  # the router's own choice, also where another is replayed
                self._recorded.append(experts.detach().to(torch.int16))
            if self._given is not None:
                given = self._given[:, :, layer].reshape(-1, experts.shape[-1]).to(experts.device)
                experts = torch.where(given >= 0, given.long(), experts)
                weights = torch.softmax(logits.float(), dim=-1).gather(-1, experts)
                if router.norm_topk_prob:
                    weights = weights / weights.sum(dim=-1, keepdim=True)
                scores = weights.to(scores.dtype)
            return logits, scores, experts
        return hook

    def take(self, rows: int, positions: int) -> torch.Tensor:
        """[rows, positions, layers, k] experts chosen in the last forward pass (of `rows` x `positions`
        tokens); clears the record."""
        if len(self._recorded) != len(self.routers):
            raise RuntimeError(f"{len(self._recorded)} router choices recorded for {len(self.routers)} MoE layers: "
                               "take() must follow exactly one forward pass")
        chosen = torch.stack(self._recorded, dim=1)  # [rows x positions, layers, k]
        self._recorded.clear()
        return chosen.reshape(rows, positions, *chosen.shape[1:])

    def discard(self) -> None:
        self._recorded.clear()

    @contextlib.contextmanager
    def replaying(self, given: Optional[torch.Tensor]):
        """Forward passes in this context route position (row, j) of the batch to given[row, j] where it is
        not NOT_GIVEN. `given` [rows, <= positions, layers, k] covers the leading positions of each row; the
        rest route freely. None: nothing is replayed."""
        self._given = given
        try:
            yield
        finally:
            self._given = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._recorded.clear()


def expert_counts(routing: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[layers, experts]: how many of the token slots of `routing` [rows, positions, layers, k] at the `valid`
    [rows, positions] positions each expert got."""
    chosen = routing[valid].long()  # [tokens, layers, k]
    layers = chosen.shape[1]
    offsets = torch.arange(layers)[None, :, None] * num_experts
    return torch.bincount((chosen + offsets).flatten(), minlength=layers * num_experts).reshape(layers, num_experts)


def load_max(counts: torch.Tensor) -> float:
    """The busiest expert's share of a layer's token slots against an even share (1 = balanced, E/k = one
    expert of k takes all of them), the largest over layers: the router's balance, logged as
    moe/expert_load_max."""
    totals = counts.sum(-1, keepdim=True).clamp(min=1)
    return float((counts * counts.shape[-1] / totals).max())


def fit_positions(given: torch.Tensor, positions: int) -> torch.Tensor:
    """`given` [rows, p, layers, k] cut or padded (with NOT_GIVEN) to `positions` positions."""
    if given.shape[1] >= positions:
        return given[:, :positions]
    pad = given.new_full((given.shape[0], positions - given.shape[1], *given.shape[2:]), NOT_GIVEN)
    return torch.cat([given, pad], dim=1)


def disagreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position [rows, positions], whether any layer's set of experts differs between routings `a` and
    `b` ([rows, positions, layers, k]; the order within a set does not matter)."""
    return (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1).any(dim=-1)
