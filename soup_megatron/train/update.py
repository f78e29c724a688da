"""Update: a step's samples as token tensors -> old log-probs -> PPO epochs of the token-ratio loss.

pi_old is the actor's re-scored log-prob under the weights the update starts from, the proximal policy the
clip is taken around, r_t = pi_theta / pi_old. With one-step-off rollout the behaviour policy mu (the
engine's log-probs, one version older) enters through `algo.rollout_correction` alone, w_t = pi_old / mu
(tis: min(w_t, cap) * l_t; mis: l_t only where w_t is in [1/cap, cap]), which covers the policy lag and the
engine mismatch together (decoupled PPO); with rollout_correction = none the lag is not corrected. Prefix
tokens keep their `soup.prefix_mode`'s own correction against the historical policy (algo/loss.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..actor.base import Actor, TokenBatch, with_filler_rows
from ..algo.loss import LossConfig, LossScale, advantage_weights, zero_loss_rows
from ..algo.rollout_correction import correction_stats, rollout_correction
from ..algo.stats import mean_over_updates, segment_stats
from ..config import Config
from ..model.hf import pad_rows
from ..model.routing import NOT_GIVEN, disagreement
from ..rollout.base import RolloutEngine
from ..sample import CONTINUATION, PROMPT, SEGMENT_NAMES, Sample
from .stage import Timer, step_seed


class Updater:
    def __init__(self, cfg: Config, actor: Actor, pad_id: int, ref_engine: Optional[RolloutEngine] = None):
        self.cfg, self.actor, self.pad_id, self.ref_engine = cfg, actor, pad_id, ref_engine
        self.loss_cfg = LossConfig.from_config(cfg)

    def train(self, samples: list[Sample], step: int, timer: Timer) -> dict:
        """The update of step `step` on its selected samples; the actor is then version step + 1."""
        if not samples:  # dynamic sampling found no informative group: nothing to train on
            self.actor.version = step + 1
            stats = {"train/samples_trained": 0.0}
        else:
            batch = self.make_batch(samples)
            staleness = self.check_staleness(batch)
            stats = {**self.update(batch, step, timer), **staleness}
        return {**stats, **overlong_stats(samples, self.cfg.algo.overlong_filter)}

    def make_batch(self, samples: list[Sample]) -> TokenBatch:
        """Samples as tensors. With algo.overlong_filter a response the length limit cut keeps its tokens but no
        segment tags, so it has no trained token (no loss, not counted)."""
        ids, mask = pad_rows([s.prompt_ids + s.response_ids for s in samples], self.pad_id)
        n, width = ids.shape
        segment = torch.full((n, width - 1), PROMPT, dtype=torch.long)
        behaviour = torch.zeros((n, width - 1))
        versions = torch.full((n, width - 1), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            p, r = len(s.prompt_ids), len(s.response_ids)
            if not (self.cfg.algo.overlong_filter and s.finish_reason == "length"):
                segment[i, p - 1: p - 1 + r] = torch.tensor(s.segments, dtype=torch.long)
            behaviour[i, p - 1: p - 1 + r] = torch.tensor(s.behaviour_logp)
            versions[i, p - 1: p - 1 + r] = torch.tensor(s.versions, dtype=torch.long)
        return TokenBatch(ids, mask, segment, behaviour, versions, torch.tensor([s.advantage for s in samples]),
                          routing=rollout_routing(samples, width - 1))

    def check_staleness(self, batch: TokenBatch) -> dict:
        """Per continuation token the update trains on: the trainer's version minus the version that wrote it;
        refused past the bound."""
        lags = self.actor.version - batch.versions[batch.segment == CONTINUATION]
        if not len(lags):
            return {"staleness/max": 0.0, "staleness/mean": 0.0}
        oldest = int(lags.max())
        if oldest > self.cfg.rollout.async_steps:
            raise RuntimeError(f"a continuation token written by policy version {self.actor.version - oldest} "
                               f"reached the update of version {self.actor.version}: older than rollout.async_steps="
                               f"{self.cfg.rollout.async_steps} allows")
        return {"staleness/max": float(oldest), "staleness/mean": float(lags.float().mean())}

    def update(self, batch: TokenBatch, step: int, timer: Timer) -> dict:
        """Old log-probs, then PPO epochs over shuffled minibatches with the SOUP loss.

        A sample whose loss is identically zero (advantage 0: its group's rewards were all equal) gets no
        forward or backward pass; its update's loss weights still count it, so the update is the one the
        whole minibatch gives. An update left with no such sample takes no optimizer step."""
        c = self.cfg
        with timer("train"):
            gen = torch.Generator().manual_seed(step_seed(c.seed, step, "minibatch"))
            # even splits; uneven only when dynamic sampling ran short of groups
            updates = [rows for order in (torch.randperm(len(batch), generator=gen) for _ in range(c.algo.epochs))
                       for rows in torch.tensor_split(order, c.algo.minibatches) if len(rows)]
            zero = zero_loss_rows(batch.advantages, batch.segment, self.loss_cfg)
            trained = [self._rows_to_train(rows, zero) for rows in updates]
            scored = sorted(set().union(*(r.tolist() for r in trained)))
            batch.old_logp = torch.zeros_like(batch.behaviour_logp)
            routing = {}
            if scored:
                rows = torch.tensor(scored)
                if c.actor.routing_replay == "none":
                    old_logp, _ = self.actor.logprobs(batch.select(rows), c.rollout.temperature)
                else:
                    if c.actor.routing_replay == "recorded":
                        batch.routing = None  # the log-prob pass routes freely; the update replays its choice
                    old_logp, _, natural = self.actor.logprobs(batch.select(rows), c.rollout.temperature,
                                                               with_routing=True)
                    routing = replay_routing(batch, rows, natural)
                    if c.actor.routing_replay == "recorded":
                        routing = {}  # nothing was given: the update replays the log-prob pass's own choice
                batch.old_logp[rows, : old_logp.shape[1]] = old_logp
            if self.ref_engine is not None:
                batch.ref_logp = self._reference_logprobs(batch)
            correction = {}
            if c.algo.rollout_correction != "none":
                batch.correction = rollout_correction(batch.old_logp, batch.behaviour_logp, batch.segment,
                                                      c.algo.rollout_correction, c.algo.rollout_correction_level,
                                                      c.algo.rollout_correction_cap)
                if scored:
                    correction = correction_stats(batch.correction[scored], batch.segment[scored],
                                                  c.algo.rollout_correction)
            per_update = []
            for rows, picked in zip(updates, trained):
                if not len(picked):
                    continue
                mb = batch.select(picked)
                mb = with_filler_rows(mb, self.actor.rows_per_update(len(mb)) - len(mb))
                scale = LossScale.of(batch.segment[rows], self.loss_cfg.prefix_mode)
                out = self.actor.train_minibatch(mb, self.loss_cfg, c.rollout.temperature, scale)
                stats = segment_stats(out["segment"], out["ratio"], out["clipped"], out["ratio_out"], out["entropy"],
                                      advantage_weights(mb.advantages, mb.segment, self.loss_cfg, scale).flatten())
                stats.update(loss=out["loss"], grad_norm=out["grad_norm"])
                stats.update({k: v for k, v in out.items() if k.startswith("moe/")})  # a MoE model's router
                if out.get("computed_tokens"):
                    stats["train/padding_share"] = out["padded_tokens"] / out["computed_tokens"]
                per_update.append(stats)
            self.actor.version = step + 1
        stats = mean_over_updates(per_update)
        stats.update(correction)
        stats.update(routing)
        stats.update({"train/zero_loss_samples": float(zero.sum()),
                      "train/samples_trained": float(sum(len(r) for r in trained)) / c.algo.epochs,
                      "train/updates_skipped": float(len(updates) - len(per_update))})
        cont = torch.zeros_like(batch.segment, dtype=torch.bool)
        if scored:
            cont[scored] = batch.segment[scored] == CONTINUATION
        if cont.any():  # train/rollout mismatch: the actor's pi_old against the engine's own log-probs of the
            # tokens it wrote (of the scored samples); `tokens` says how many were compared
            gap = (batch.old_logp - batch.behaviour_logp)[cont].abs()
            stats.update({"logp_gap/mean": float(gap.mean()), "logp_gap/max": float(gap.max()),
                          "logp_gap/tokens": float(cont.sum())})
        return stats

    def _rows_to_train(self, rows: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The rows of one update that need a pass: those with a non-zero loss, topped up (in `rows`'
        order) with zero-loss ones to a count the actor can split; none when every loss is zero."""
        live = ~zero[rows]
        if not live.any():
            return rows[:0]
        fill = self.actor.rows_per_update(int(live.sum())) - int(live.sum())
        keep = live | (~live & ((~live).cumsum(0) <= fill))
        return rows[keep]

    def _reference_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """The reference policy's log-probs of every row's tokens (algo.kl_coef > 0), scored by its engine."""
        ref = torch.zeros_like(batch.behaviour_logp)
        lengths = batch.attention_mask.sum(-1).tolist()
        rows = [batch.input_ids[i, : lengths[i]].tolist() for i in range(len(batch))]
        scores = self.ref_engine.score([r[:1] for r in rows], [r[1:] for r in rows], self.cfg.rollout.temperature)
        for i, s in enumerate(scores):
            ref[i, : len(s)] = torch.tensor(s)
        return ref


def rollout_routing(samples: list[Sample], positions: int) -> Optional[torch.Tensor]:
    """The rollout engine's routing of each sample as [N, positions, layers, k] (NOT_GIVEN past a sample's
    end and for a sample without one), or None when no sample has one."""
    given = [s for s in samples if s.routing is not None]
    if not given:
        return None
    out = torch.full((len(samples), positions, *given[0].routing.shape[1:]), NOT_GIVEN, dtype=torch.int16)
    for i, s in enumerate(samples):
        if s.routing is None:
            continue
        expected = len(s.prompt_ids) + len(s.response_ids) - 1
        if s.routing.shape[0] != expected:
            raise RuntimeError(f"the rollout engine returned routing for {s.routing.shape[0]} positions of a sample "
                               f"of {expected + 1} tokens (expected {expected}: all but the last)")
        out[i, :expected] = s.routing
    return out


def replay_routing(batch: TokenBatch, rows: torch.Tensor, natural: torch.Tensor) -> dict:
    """Set what the update replays: the routing given with the batch (the rollout engine's) and, where none
    is given, `natural`, what the trainer's log-prob pass of `rows` chose. Returns how often the two differ
    (any layer's expert set) among the positions given, per segment of the token each position predicts,
    and the share of positions given."""
    positions = natural.shape[1]
    given = batch.routing[rows, :positions] if batch.routing is not None else torch.full_like(natural, NOT_GIVEN)
    has = given[..., 0, 0] >= 0
    differ = disagreement(natural, given) & has
    valid = batch.attention_mask[rows, 1: positions + 1] > 0
    if batch.routing is None:
        batch.routing = torch.full((len(batch), batch.segment.shape[1], *natural.shape[2:]), NOT_GIVEN,
                                   dtype=torch.int16)
    batch.routing[rows, :positions] = torch.where(has[..., None, None], given, natural)
    stats = {"moe/routing_given_share": float(has.sum() / valid.sum().clamp(min=1))}
    if has.any():
        stats["moe/routing_disagreement"] = float(differ.sum() / has.sum())
        segment = batch.segment[rows, :positions]
        for code, name in SEGMENT_NAMES.items():
            part = has & (segment == code)
            if part.any():
                stats[f"moe/routing_disagreement/{name}"] = float(differ[part].sum() / part.sum())
    return stats


def overlong_stats(samples: list[Sample], overlong_filter: bool) -> dict:
    """Trained responses the length limit cut, and those algo.overlong_filter kept out of the loss."""
    cut = float(sum(s.finish_reason == "length" for s in samples))
    return {"overlong/truncated": cut, "overlong/filtered": cut if overlong_filter else 0.0}
