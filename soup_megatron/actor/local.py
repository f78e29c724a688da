"""Local PyTorch actor on the Hugging Face model (CPU or one GPU), micro-batched. A mixture-of-experts model's
routers are tapped (model/routing.py): the log-prob pass reports what they chose, and `batch.routing`,
where given, is replayed in every pass."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import torch

from ..algo.loss import LossConfig, LossScale, aggregation_weights, loss_mask, soup_loss
from ..config import ActorConfig
from ..model.hf import copy_side_files, load_model, load_weights_into, read_state_dict, token_logprobs
from ..model.routing import RoutingTap, expert_counts, fit_positions, load_max, routing_shape
from .base import PER_TOKEN_STATS, TokenBatch, padding_share, per_token_stats, plan_micro_batches


class LocalActor:
    def __init__(self, model_path: str | Path, cfg: ActorConfig):
        self.model_path = Path(model_path)
        self.model = load_model(model_path)
        self.cfg = cfg
        self.version = 0
        self.places = [{"host": socket.gethostname(), "rank": 0}]
        self.routing = RoutingTap(self.model) if routing_shape(self.model) else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _plan(self, batch: TokenBatch) -> tuple[list[int], list[list[int]]]:
        """Row lengths and micro-batches: by actor.micro_batch_size rows or, with
        actor.max_tokens_per_micro_batch, by a token budget."""
        lengths = batch.attention_mask.sum(-1).tolist()
        return lengths, plan_micro_batches(lengths, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch)

    @staticmethod
    def _micro_batches(batch: TokenBatch, plans: list[list[int]]):
        """(rows, micro-batch trimmed to its own longest row) per planned micro-batch."""
        for rows in plans:
            rows = torch.tensor(rows)
            yield rows, batch.select(rows)

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, temperature: float, with_entropy: bool = False, with_routing: bool = False):
        self.model.eval()
        width = batch.input_ids.shape[1] - 1
        logp = torch.zeros(len(batch), width)
        entropy = torch.zeros(len(batch), width) if with_entropy else None
        routing = None
        if with_routing:
            if self.routing is None:
                raise ValueError(f"{self.model_path}: routing asked of a dense model")
            routing = torch.full((len(batch), width, *routing_shape(self.model)), -1, dtype=torch.int16)
        for rows, mb in self._micro_batches(batch, self._plan(batch)[1]):
            with self._replaying(mb):
                lp, ent = token_logprobs(self.model, mb.input_ids, mb.attention_mask, temperature, with_entropy)
            logp[rows, : lp.shape[1]] = lp
            if with_entropy:
                entropy[rows, : ent.shape[1]] = ent
            if self.routing is not None:
                chosen = self.routing.take(*mb.input_ids.shape)[:, :-1]
                if with_routing:
                    routing[rows, : chosen.shape[1]] = chosen
        return (logp, entropy, routing) if with_routing else (logp, entropy)

    def _replaying(self, mb: TokenBatch):
        """The context of a forward pass of micro-batch `mb`: its routing replayed (a MoE model)."""
        if self.routing is None:
            return contextlib.nullcontext()
        given = None if mb.routing is None else fit_positions(mb.routing, mb.input_ids.shape[1])
        return self.routing.replaying(given)

    def rows_per_update(self, rows: int) -> int:
        return max(rows, 1)

    def train_minibatch(self, batch: TokenBatch, loss_cfg: LossConfig, temperature: float,
                        scale: LossScale | None = None) -> dict:
        self.model.train()
        scale = scale or LossScale.of(batch.segment, loss_cfg.prefix_mode)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        width = batch.segment.shape[1]
        stats = {k: torch.zeros(len(batch), width) for k in PER_TOKEN_STATS}
        lengths, plans = self._plan(batch)
        experts = self.model.config.num_experts if self.routing is not None else 0
        counts = 0
        for rows, mb in self._micro_batches(batch, plans):
            # entropy too: it is logged per segment
            with self._replaying(mb):
                logp, entropy = token_logprobs(self.model, mb.input_ids, mb.attention_mask, temperature, True)
            if self.routing is not None:  # the routers' own choices, on the micro-batch's real tokens
                counts = counts + expert_counts(self.routing.take(*mb.input_ids.shape), mb.attention_mask > 0,
                                                experts)
            weights = aggregation_weights(loss_mask(mb.segment, loss_cfg.prefix_mode), loss_cfg.loss_agg,
                                          scale.sequences, scale.tokens)
            loss, tok = soup_loss(logp, mb.old_logp, mb.behaviour_logp, mb.advantages, mb.segment, weights,
                                  loss_cfg, entropy=entropy, ref_logp=mb.ref_logp, correction=mb.correction)
            loss.backward()
            total_loss += loss.item()
            cols = mb.segment.shape[1]
            for key, value in {**tok, "entropy": entropy.detach()}.items():
                stats[key][rows, :cols] = value.float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.model.eval()
        out = per_token_stats(stats)
        out.update(segment=batch.segment.flatten(), loss=total_loss, grad_norm=float(grad_norm))
        if experts:
            out["moe/expert_load_max"] = load_max(counts)
        pad, computed = padding_share(lengths, plans)
        out.update(padded_tokens=float(pad), computed_tokens=float(computed))
        return out

    def step_stats(self) -> dict[str, float]:
        return {}  # one process: nothing is sent anywhere

    def rollout_weights(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save_hf(self, path: Path) -> None:
        self.model.save_pretrained(path)
        copy_side_files(self.model_path, path)  # tokenizer, chat template

    def close(self) -> None:
        """Nothing outside this process."""

    def save_state(self, path: Path) -> None:
        path = Path(path)
        self.save_hf(path / "model")
        torch.save({"optimizer": self.optimizer.state_dict(), "version": self.version}, path / "optimizer.pt")

    def load_state(self, path: Path) -> None:
        path = Path(path)
        load_weights_into(self.model, read_state_dict(path / "model"))
        state = torch.load(path / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = state["version"]
