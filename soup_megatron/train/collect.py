"""Collect a step's samples: prompts -> prefix (historical policy) -> continuation (rollout engine) -> reward
-> group advantage, then dynamic sampling's refills; with `rollout.async_steps = 1` the next step's rollout
runs ahead in a thread while this step trains.

A mixed sample of a group is cut from one of the prompt's historical trajectories (`soup.history_per_prompt`
per prompt, mixed sample j from trajectory j mod that) at its own cut point, and the on-policy engine
continues it; the unmixed samples are written on-policy from the prompt. Every random choice comes from
(seed, step, purpose), so a resumed run collects exactly the samples an uninterrupted one does.

One-step-off: the thread only rolls out (prefixes and continuations, on the engine's weights of the step
before); rewards, advantages and refills run in the main thread when the step that trains on them begins
(verifiers may rely on signals, as math-verify's timeout does), so refill groups are written by the current
weights. The rollout collected ahead is part of a trainer checkpoint (`ahead`).
"""

from __future__ import annotations

import contextlib
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from ..algo.advantage import group_advantages
from ..algo.dynamic_sampling import informative_groups, refill_prompts
from ..algo.mixing import cut_point
from ..algo.overlong import overlong_penalty
from ..config import Config
from ..data.encoding import PromptFormat
from ..data.prompt import Prompt
from ..data.prompts import prompts_for_step
from ..history.base import PrefixSource
from ..reward import RewardFn
from ..rollout.base import GenerationRequest, RolloutEngine
from ..sample import CONTINUATION, PREFIX, Sample, Trajectory
from .stage import Timer, step_seed


class StepPrompts:
    """The training prompts of each step, their token ids, and the historical trajectories a step needs."""

    def __init__(self, cfg: Config, prompts: list[Prompt], fmt: PromptFormat, n_hist: int):
        self.cfg, self.prompts, self.format, self.n_hist = cfg, prompts, fmt, n_hist

    def ids(self, prompt: Prompt) -> tuple[int, ...]:
        return self.format.prompt_ids(prompt.text)

    def of_step(self, step: int) -> list[Prompt]:
        return prompts_for_step(self.prompts, step, self.cfg.rollout.prompts_per_step, self.cfg.seed)

    def history_slots(self, step: int) -> list[tuple[str, tuple[int, ...]]]:
        """(prompt uid, prompt ids) of the historical trajectories step `step` needs: `n_hist` per prompt,
        prompt-major (the prefix source's plan)."""
        return [(p.uid, self.ids(p)) for p in self.of_step(step) for _ in range(self.n_hist)]


@dataclass
class Collected:
    """A step's rollout as the rollout stage left it (not yet scored), with its metrics and stage times."""

    step: int
    samples: list[Sample]
    info: dict
    seconds: dict[str, float]


class Collector:
    def __init__(self, cfg: Config, prompts: StepPrompts, engine: RolloutEngine, prefixes: PrefixSource,
                 reward_fn: RewardFn, n_mix: int, newline_ids: frozenset[int], colocated_history=None):
        self.cfg, self.prompts, self.engine, self.prefixes = cfg, prompts, engine, prefixes
        self.reward_fn, self.n_mix, self.newline_ids = reward_fn, n_mix, newline_ids
        self.colocated_history = colocated_history  # paused while the on-policy rollout runs on its GPUs
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="soup-rollout")
        self.next_rollout: Optional[Future] = None
        self.ahead: Optional[Collected] = None  # a step's rollout collected ahead (and in checkpoints)

    # ---- the rollout -----------------------------------------------------------------------------
    def rollout(self, step: int, timer: Timer) -> tuple[list[Sample], dict]:
        """Prefixes from the historical source, continuations from the on-policy engine."""
        prompts = self.prompts.of_step(step)
        with timer("prefix_wait"):
            history = self.prefixes.take(step)
        samples, info = self._generate(step, prompts, history, 0, timer)
        info.update(self.prefixes.step_stats(step))  # with the rollout: a checkpoint of it keeps them
        self.prefixes.schedule(step)  # upcoming prefixes are generated while this step trains
        return samples, info

    def _generate(self, step: int, prompts: list[Prompt], history: list[Optional[Trajectory]], refill: int,
                  timer: Timer) -> tuple[list[Sample], dict]:
        """The groups of `prompts`: mixed samples cut from `history` (n_hist slots per prompt), continued
        on-policy; `refill` > 0 for dynamic sampling's refill rounds, which draw their own random streams."""
        c, n_hist = self.cfg, self.prompts.n_hist
        suffix = f"-refill-{refill}" if refill else ""
        cut_rng = random.Random(step_seed(c.seed, step, "cut" + suffix))
        samples, requests = [], []
        misses = 0
        cut_length = c.rollout.max_response_len if c.soup.cut_of == "max_length" else None
        for i, prompt in enumerate(prompts):
            for j in range(c.rollout.group_size):
                s = Sample(prompt=prompt, prompt_ids=list(self.prompts.ids(prompt)))
                traj: Optional[Trajectory] = history[i * n_hist + j % n_hist] if j < self.n_mix else None
                misses += j < self.n_mix and traj is None
                if traj is not None:
                    s.mixed = True
                    s.cut = len(traj.token_ids) if c.soup.mode == "trajectory" else cut_point(
                        traj.token_ids, traj.finished, cut_rng, c.soup.cut_min, c.soup.cut_max, c.soup.cut_at,
                        self.newline_ids, cut_length)
                    s.response_ids = traj.token_ids[: s.cut]
                    s.behaviour_logp = traj.logprobs[: s.cut]
                    s.versions = traj.versions[: s.cut]
                    s.segments = [PREFIX] * s.cut
                    # done at the cut only when the history ended (EOS) or the response budget is spent: with
                    # cut_of=max_length a trajectory stops at cut_max * max_response_len, short of the budget
                    if s.cut == len(traj.token_ids) and (traj.finished or s.cut >= c.rollout.max_response_len):
                        s.finish_reason = "stop" if traj.finished else "length"
                samples.append(s)
                requests.append(GenerationRequest(tuple(s.prompt_ids), tuple(s.response_ids),
                                                  0 if s.finish_reason else c.rollout.max_response_len - s.cut))
        with timer("rollout"), self._history_yields():
            generations = self.engine.generate(requests, c.rollout.temperature,
                                               step_seed(c.seed, step, "rollout" + suffix))
        for s, g in zip(samples, generations):
            if s.finish_reason:
                continue
            s.response_ids += g.token_ids
            s.behaviour_logp += g.logprobs
            s.versions += [g.version] * len(g.token_ids)
            s.segments += [CONTINUATION] * len(g.token_ids)
            s.finish_reason = g.finish_reason
            s.routing = g.routing
        info = {"mix/replay_misses": float(misses),
                "tokens/decoded": float(sum(len(g.token_ids) for g in generations)),
                "tokens/prefix": float(sum(s.cut for s in samples)),
                "tokens/prefilled": float(sum(len(r.prompt_ids) + len(r.prefix_ids) for r in requests
                                              if r.max_new_tokens > 0))}
        info["tokens/decode_steps"] = float(max((len(g.token_ids) for g in generations), default=0))
        info.update({f"tokens/{k}": v for k, v in self.engine.stats().items()})
        return samples, info

    @contextlib.contextmanager
    def _history_yields(self):
        """Colocated history servers pause while the on-policy rollout runs on their GPUs."""
        if self.colocated_history is None:
            yield
            return
        self.colocated_history.pause_generation()
        try:
            yield
        finally:
            self.colocated_history.continue_generation()

    # ---- reward and advantage, dynamic sampling ---------------------------------------------------
    def score(self, samples: list[Sample]) -> None:
        """Reward on the whole response (prefix + continuation), with the soft overlong penalty when
        algo.overlong_penalty_len is set, then group advantages."""
        c, a = self.cfg, self.cfg.algo
        for s in samples:
            s.reward = float(self.reward_fn(self.prompts.format.response_text(s.response_ids), s.prompt.answer))
            s.reward += overlong_penalty(len(s.response_ids), c.rollout.max_response_len,
                                         a.overlong_penalty_len, a.overlong_penalty_factor)
        adv = group_advantages(torch.tensor([s.reward for s in samples]), c.rollout.group_size, a.adv_norm, a.adv_eps)
        for s, advantage in zip(samples, adv.tolist()):
            s.advantage = advantage

    def dynamic_sampling(self, step: int, samples: list[Sample], timer: Timer
                         ) -> tuple[list[Sample], list[Sample], dict]:
        """DAPO's group filter over scored `samples`: groups whose rewards are all equal are dropped, and
        refill rounds sample groups for more training prompts (drawn from (seed, step, round), none twice in
        a step; their prefixes come from the prefix source like the step's own) until there are
        rollout.prompts_per_step informative groups or algo.dynamic_sampling_max_rounds rounds are spent.
        Returns the kept samples, every sample generated (the refills' too) and what it did."""
        c = self.cfg
        size, wanted = c.rollout.group_size, c.rollout.prompts_per_step
        kept: list[Sample] = []
        dropped = rounds = 0
        seen = {s.prompt.uid for s in samples}
        info: dict[str, float] = {}
        batch, generated = samples, list(samples)
        while True:
            informative = informative_groups(torch.tensor([s.reward for s in batch]), size).tolist()
            for g, keep in enumerate(informative):
                if keep:
                    kept += batch[g * size: (g + 1) * size]
                dropped += not keep
            missing = wanted - len(kept) // size
            if missing <= 0 or rounds == c.algo.dynamic_sampling_max_rounds:
                break
            rounds += 1
            prompts = refill_prompts([p for p in self.prompts.prompts if p.uid not in seen], missing,
                                     step_seed(c.seed, step, f"refill-{rounds}"))
            if not prompts:
                break
            seen |= {p.uid for p in prompts}
            slots = [(p.uid, self.prompts.ids(p)) for p in prompts for _ in range(self.prompts.n_hist)]
            with timer("prefix_wait"):
                history = self.prefixes.take_slots(step, rounds, slots)
            batch, more = self._generate(step, prompts, history, rounds, timer)
            self.score(batch)
            generated += batch
            for k in ("tokens/decoded", "tokens/prefilled", "mix/replay_misses"):
                info[k] = info.get(k, 0.0) + more[k]
        kept = kept[: wanted * size]
        info.update({"dynamic/groups_kept": float(len(kept) // size), "dynamic/groups_dropped": float(dropped),
                     "dynamic/refill_rounds": float(rounds),
                     "dynamic/groups_short": float(wanted - len(kept) // size)})
        return kept, generated, info

    def score_and_select(self, collected: Collected, timer: Timer) -> tuple[list[Sample], list[Sample], dict]:
        """Rewards and advantages of the rollout, then dynamic sampling's refills: (samples to train on,
        every sample generated, metrics)."""
        first_round, info = collected.samples, dict(collected.info)
        self.score(first_round)
        samples, generated = first_round, first_round
        if self.cfg.algo.dynamic_sampling:
            samples, generated, refills = self.dynamic_sampling(collected.step, first_round, timer)
            for key, value in refills.items():
                info[key] = info.get(key, 0.0) + value
        info.update(sample_stats(first_round))
        return samples, generated, info

    # ---- this step's rollout, and the next one's ahead ----------------------------------------------
    def collect(self, step: int) -> Collected:
        """Step `step`'s rollout, not yet scored (the one-step-off thread runs this)."""
        timer = Timer()
        samples, info = self.rollout(step, timer)
        return Collected(step, samples, info, timer.seconds)

    def take(self, step: int, timer: Timer) -> Collected:
        """Step `step`'s rollout: done now (synchronous, or the first step after a start), or by the one-step-off
        rollout that ran during the previous step's training."""
        if self.ahead is not None and self.ahead.step == step:
            collected, self.ahead = self.ahead, None
            return collected
        if not self.cfg.rollout.async_steps:
            return self.collect(step)
        with timer("rollout_wait"):  # the first step of a one-step-off run has nothing ahead
            return self.collect(step)

    def start_ahead(self, step: int) -> None:
        """rollout.async_steps = 1: step+1's rollout runs on the engine's current weights (version `step`)
        while this step trains; the weights are synced only once it is done, so it waits at most one step."""
        if self.cfg.rollout.async_steps and step + 1 < self.cfg.trainer.steps:
            self.next_rollout = self.thread.submit(self.collect, step + 1)

    def finish_ahead(self, timer: Timer) -> None:
        """Wait for the rollout started ahead (before the weights change under it)."""
        if self.next_rollout is not None:
            with timer("rollout_wait"):
                self.ahead = self.next_rollout.result()
            self.next_rollout = None

    def close(self) -> None:
        self.thread.shutdown(wait=False, cancel_futures=True)


def sample_stats(samples: list[Sample]) -> dict:
    """Rewards, lengths and mixing of a step's first-round samples."""
    rewards = torch.tensor([s.reward for s in samples])
    mixed = torch.tensor([s.mixed for s in samples])
    out = {"reward_mean": float(rewards.mean()),
           "response_len": float(sum(len(s.response_ids) for s in samples) / len(samples)),
           "mix/mixed_samples": float(mixed.sum()),
           # mixed samples whose cut fell at 0 (cut_at=line with no newline before it)
           "mix/empty_prefixes": float(sum(s.mixed and s.cut == 0 for s in samples))}
    if mixed.any():
        out["reward_mean/mixed"] = float(rewards[mixed].mean())
    if (~mixed).any():
        out["reward_mean/on_policy"] = float(rewards[~mixed].mean())
    return out
