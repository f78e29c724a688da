"""The SOUP training loop, one function per stage of the data flow:

    prompts -> prefix (historical policy) -> continuation (rollout engine) -> reward -> advantage
            -> old log-probs -> token-ratio loss, PPO epochs -> weight sync -> history

GRPO (`soup.mix_fraction = 0`) and trajectory-level mixing (`soup.mode = trajectory`) run through the
same code. Every random choice is derived from (seed, step), and a trainer checkpoint holds weights,
optimizer, history pool, pending prefix jobs and the replay buffer, so a run killed at any point and
resumed reaches the same state as an uninterrupted one.

One-step-off rollout (`rollout.async_steps = 1`): step n+1's rollout runs on the engine's weights of
version n while step n trains, and the weights are synced only after it is done, so at step n+1's update
(actor version n+1) every continuation token is exactly one version old (`staleness/*`; an older one is
refused). The loss keeps its form: pi_old is the actor's re-scored log-prob under the weights the update
starts from (version n+1), the proximal policy the clip is taken around, r_t = pi_theta / pi_old. The
behaviour policy mu (version n, the engine's own log-probs) enters through `algo.rollout_correction`
alone, w_t = pi_old / mu (tis: min(w_t, cap) * l_t; mis: l_t only where w_t is in [1/cap, cap]): that
weight then covers the policy lag and the engine mismatch together (decoupled PPO). With
rollout_correction = none the lag is not corrected. SOUP's prefixes are taken and cut in the rollout
stage as in a synchronous step. Rewards, advantages and dynamic sampling's refills run in the main thread
when the step that trains on them begins (verifiers may rely on signals, as math-verify's timeout does),
so refill groups are written by the current weights. A checkpoint holds the next step's rollout, so a
resume trains on it.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ..actor.base import TokenBatch, with_filler_rows
from ..algo.advantage import group_advantages
from ..algo.dynamic_sampling import informative_groups, refill_prompts
from ..algo.loss import LossConfig, LossScale, zero_loss_rows
from ..algo.mixing import cut_point, history_length, mixed_count
from ..algo.overlong import overlong_penalty
from ..algo.rollout_correction import correction_stats, rollout_correction
from ..algo.stats import mean_over_updates, segment_stats
from ..config import Config, changed_keys, to_container, to_yaml
from ..data.encoding import PromptFormat
from ..data.prompts import Prompt, load_splits, prompts_for_step
from ..evaluate import heldout_metrics
from ..history.base import NoPrefixes
from ..history.prefix_cache import PrefixCache
from ..history.replay import ReplayBuffer
from ..history.store import CheckpointStore
from ..io import atomic_dir, atomic_write_json, atomic_write_text, make_private_dir, read_json, remove_tmp_leftovers
from ..log import get_logger
from ..metrics import MetricsLog, WandbSettings, plot_curves
from ..model.hf import CheckpointError, load_tokenizer, newline_token_ids, pad_rows, pad_token_id
from ..reward import build_reward
from ..rollout.base import GenerationRequest
from ..sample import CONTINUATION, PREFIX, PROMPT, Sample, Trajectory
from .runtime import Runtime
from .shutdown import refuse_restart_without_checkpoints, stop_asked

log = get_logger(__name__)


def step_seed(seed: int, step: int, stream: str) -> int:
    """An independent, reproducible random stream per (seed, step, purpose)."""
    return zlib.crc32(f"{seed}-{step}-{stream}".encode())


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Collected:
    """A step's rollout as the rollout stage left it (not yet scored), with its metrics and stage times."""

    step: int
    samples: list[Sample]
    info: dict
    seconds: dict[str, float]


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = make_private_dir(cfg.trainer.out_dir)  # checkpoints and server keys: the user's own
        self.ckpt_root = self.out / "checkpoints"
        refuse_restart_without_checkpoints(self.ckpt_root)
        self.ckpt_root.mkdir(exist_ok=True)
        remove_tmp_leftovers(self.ckpt_root)
        self.train_prompts, self.heldout = load_splits(cfg.data, cfg.seed)  # cheap checks of inputs first
        self.reward_fn = build_reward(cfg.reward)
        tokenizer = load_tokenizer(cfg.model.path)
        self.format = PromptFormat.of(tokenizer, cfg.data, cfg.model.path)
        self.pad_id = pad_token_id(tokenizer)
        self.newline_ids = newline_token_ids(tokenizer) if cfg.soup.cut_at == "line" else frozenset()
        self.loss_cfg = LossConfig.from_config(cfg)
        self.n_mix = mixed_count(cfg.rollout.group_size, cfg.soup.mix_fraction)
        # historical trajectories per prompt: mixed sample j is cut from trajectory j mod n_hist
        shared = cfg.soup.mode == "token" and cfg.soup.history_per_prompt > 0
        self.n_hist = min(cfg.soup.history_per_prompt, self.n_mix) if shared else self.n_mix

        self.runtime = Runtime(cfg, self.out, bool(self.n_mix) and cfg.soup.prefix_source == "checkpoint")
        rt = self.runtime
        self.actor, self.engine, self.weight_sync = rt.actor, rt.engine, rt.weight_sync
        self.ref_engine, self.colocated_history = rt.ref_engine, rt.colocated_history
        try:
            self._build_pipeline(cfg)
        except BaseException:
            self.close()
            raise

    def _build_pipeline(self, cfg: Config) -> None:
        """History (fresh or resumed), prefix source, logs."""
        self.prefixes, self.metrics = NoPrefixes(), None  # until built below (close() may run before)
        # rollout.async_steps = 1: the next step's rollout, running in this thread while a step trains
        self.rollout_thread = ThreadPoolExecutor(1, thread_name_prefix="soup-rollout")
        self.next_rollout: Optional[Future] = None
        self.collected: Optional[Collected] = None  # a step's samples collected ahead (and in checkpoints)
        self.start_step = 0
        latest = self.ckpt_root / "latest"
        resume_state = None
        if latest.is_file():
            if (self.out / "config.yaml").is_file():
                for change in changed_keys(self.out / "config.yaml", cfg):  # legitimate (more steps) or not
                    log.warning(f"resuming {self.out} with a changed config: {change}")
            self.store = CheckpointStore(self.out / "history", cfg.history.keep)
            resume_state = self._load_checkpoint(self.ckpt_root / latest.read_text().strip())
        else:  # a fresh run; history a crash left before the first trainer checkpoint is not ours to reuse
            shutil.rmtree(self.out / "history", ignore_errors=True)
            self.store = CheckpointStore(self.out / "history", cfg.history.keep)
            self.store.add(0, self.actor.save_hf)  # the initial policy is the first member of H
        self.prefixes = self._build_prefix_source()
        if resume_state is not None:
            self.prefixes.restore(resume_state["prefixes"])
        wandb = None
        if cfg.trainer.wandb != "off":
            wandb = WandbSettings(cfg.trainer.wandb, cfg.trainer.wandb_project,
                                  cfg.trainer.wandb_run_name or self.out.name, to_container(cfg))
        self.metrics = MetricsLog(self.out, cfg.trainer.tensorboard, self.start_step, wandb)
        atomic_write_text(self.out / "config.yaml", to_yaml(cfg))

    # ---- setup ---------------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt) -> tuple[int, ...]:
        return self.format.prompt_ids(prompt.text)

    def step_prompts(self, step: int) -> list[Prompt]:
        return prompts_for_step(self.train_prompts, step, self.cfg.rollout.prompts_per_step, self.cfg.seed)

    def plan(self, step: int) -> list[tuple[str, tuple[int, ...]]]:
        """Historical trajectories step `step` needs: `n_hist` per prompt, prompt-major."""
        return [(p.uid, self.prompt_ids(p)) for p in self.step_prompts(step) for _ in range(self.n_hist)]

    def _build_prefix_source(self):
        c = self.cfg
        if self.n_mix == 0:
            return NoPrefixes()
        if c.soup.prefix_source == "replay":
            return ReplayBuffer(self.plan, c.soup.replay_per_prompt, c.seed)
        return PrefixCache(self.store, self.plan, lookahead=c.soup.lookahead, pick=c.history.pick, seed=c.seed,
                           max_new_tokens=history_length(c.rollout.max_response_len, c.soup.cut_max, c.soup.cut_of),
                           temperature=c.rollout.temperature, rollout=c.rollout, run_dir=str(self.out),
                           steps_per_call=c.soup.history_steps_per_call)

    # ---- one step ------------------------------------------------------------------------------
    def rollout(self, step: int, timer: Timer) -> tuple[list[Sample], dict]:
        """Prefixes from the historical source, continuations from the on-policy engine."""
        prompts = self.step_prompts(step)
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
        c = self.cfg
        suffix = f"-refill-{refill}" if refill else ""
        cut_rng = random.Random(step_seed(c.seed, step, "cut" + suffix))
        samples, requests = [], []
        misses = 0
        cut_length = c.rollout.max_response_len if c.soup.cut_of == "max_length" else None
        for i, prompt in enumerate(prompts):
            for j in range(c.rollout.group_size):
                s = Sample(prompt=prompt, prompt_ids=list(self.prompt_ids(prompt)))
                traj: Optional[Trajectory] = history[i * self.n_hist + j % self.n_hist] if j < self.n_mix else None
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
        info = {"mix/replay_misses": float(misses),
                "tokens/decoded": float(sum(len(g.token_ids) for g in generations)),
                "tokens/prefix": float(sum(s.cut for s in samples)),
                "tokens/prefilled": float(sum(len(r.prompt_ids) + len(r.prefix_ids) for r in requests
                                              if r.max_new_tokens > 0))}
        info["tokens/decode_steps"] = float(max((len(g.token_ids) for g in generations), default=0))
        info.update({f"tokens/{k}": v for k, v in self.engine.stats().items()})
        return samples, info

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
            prompts = refill_prompts([p for p in self.train_prompts if p.uid not in seen], missing,
                                     step_seed(c.seed, step, f"refill-{rounds}"))
            if not prompts:
                break
            seen |= {p.uid for p in prompts}
            slots = [(p.uid, self.prompt_ids(p)) for p in prompts for _ in range(self.n_hist)]
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

    def score(self, samples: list[Sample]) -> None:
        """Reward on the whole response (prefix + continuation), with the soft overlong penalty when
        algo.overlong_penalty_len is set, then group advantages."""
        a = self.cfg.algo
        for s in samples:
            s.reward = float(self.reward_fn(self.format.response_text(s.response_ids), s.prompt.answer))
            s.reward += overlong_penalty(len(s.response_ids), self.cfg.rollout.max_response_len,
                                         a.overlong_penalty_len, a.overlong_penalty_factor)
        adv = group_advantages(torch.tensor([s.reward for s in samples]), self.cfg.rollout.group_size,
                               self.cfg.algo.adv_norm, self.cfg.algo.adv_eps)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a

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
        return TokenBatch(ids, mask, segment, behaviour, versions, torch.tensor([s.advantage for s in samples]))

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
            if scored:
                rows = torch.tensor(scored)
                old_logp, _ = self.actor.logprobs(batch.select(rows), c.rollout.temperature)
                batch.old_logp[rows, : old_logp.shape[1]] = old_logp
            if self.ref_engine is not None:
                batch.ref_logp, _ = self._reference_logprobs(batch)
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
                out = self.actor.train_minibatch(mb, self.loss_cfg, c.rollout.temperature,
                                                 LossScale.of(batch.segment[rows], self.loss_cfg.prefix_mode))
                stats = segment_stats(out["segment"], out["ratio"], out["clipped"], out["entropy"])
                stats.update(loss=out["loss"], grad_norm=out["grad_norm"])
                if out.get("computed_tokens"):
                    stats["train/padding_share"] = out["padded_tokens"] / out["computed_tokens"]
                per_update.append(stats)
            self.actor.version = step + 1
        stats = mean_over_updates(per_update)
        stats.update(correction)
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

    def _reference_logprobs(self, batch: TokenBatch):
        ref = torch.zeros_like(batch.behaviour_logp)
        lengths = batch.attention_mask.sum(-1).tolist()
        rows = [batch.input_ids[i, : lengths[i]].tolist() for i in range(len(batch))]
        scores = self.ref_engine.score([r[:1] for r in rows], [r[1:] for r in rows], self.cfg.rollout.temperature)
        for i, s in enumerate(scores):
            ref[i, : len(s)] = torch.tensor(s)
        return ref, None

    def sync_and_record(self, step: int, samples: list[Sample], timer: Timer) -> None:
        with timer("weight_sync"):
            self.weight_sync(self.actor.version)
        with timer("history"):
            if (step + 1) % self.cfg.history.interval == 0:
                self.store.add(step + 1, self.actor.save_hf)
            self.prefixes.record(samples)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        """Held-out greedy accuracy and sampled pass@1 of the current policy (the on-policy engine)."""
        c = self.cfg
        return heldout_metrics(self.engine, self.format, self.heldout, self.reward_fn,
                               max_new_tokens=c.rollout.max_response_len, temperature=c.rollout.temperature,
                               pass_samples=c.trainer.eval_pass_samples, seed=step_seed(c.seed, step, "eval"))

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        """Everything needed to continue after `step` steps, written atomically, then `latest` flips."""
        name = f"step_{step:06d}"
        needs = sorted(set(self.store.members()) | self.prefixes.pinned_versions())  # history it resumes with
        with atomic_dir(self.ckpt_root / name) as tmp:
            self.actor.save_state(tmp / "actor")
            torch.save({"prefixes": self.prefixes.state(), "collected": self.collected}, tmp / "prefixes.pt")
            atomic_write_json(tmp / "state.json", {"step": step, "history_members": self.store.members(),
                                                   "history_needed": needs})
        atomic_write_text(self.ckpt_root / "latest", name + "\n")
        for old in sorted(self.ckpt_root.glob("step_*"))[: -self.cfg.trainer.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self._pin_checkpoint_history()
        self.store.collect()

    def _pin_checkpoint_history(self) -> None:
        """Every kept trainer checkpoint can be resumed: keep the history versions any of them needs."""
        needed: set[int] = set()
        for state in self.ckpt_root.glob("step_*/state.json"):
            needed |= set(read_json(state)["history_needed"])
        self.store.pin("trainer-checkpoints", needed & set(self.store.on_disk()))

    def _load_checkpoint(self, path: Path) -> dict:
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{self.ckpt_root / 'latest'} names {path.name}, but {path} is missing or "
                                  "incomplete; restore it or start a fresh run in another trainer.out_dir")
        state = read_json(path / "state.json")
        self.actor.load_state(path / "actor")
        self.weight_sync(self.actor.version)
        self.store.restore(state["history_members"], keep=state["history_needed"])
        self._pin_checkpoint_history()
        self.start_step = state["step"]
        extra = torch.load(path / "prefixes.pt", weights_only=False)
        self.collected = extra.get("collected")  # one-step-off: the next step's samples, already generated
        return {"prefixes": extra["prefixes"]}

    # ---- the loop ------------------------------------------------------------------------------
    def collect(self, step: int) -> "Collected":
        """Step `step`'s rollout, not yet scored (the one-step-off rollout runs this in a thread: rewards are
        computed in the main thread, where verifiers may use signal-based timeouts, as math-verify does)."""
        timer = Timer()
        samples, info = self.rollout(step, timer)
        return Collected(step, samples, info, timer.seconds)

    def _rollout_for(self, step: int, timer: Timer) -> "Collected":
        """Step `step`'s rollout: done now (synchronous, or the first step after a start), or by the one-step-off
        rollout that ran during the previous step's training."""
        if self.collected is not None and self.collected.step == step:
            collected, self.collected = self.collected, None
            return collected
        if not self.cfg.rollout.async_steps:
            return self.collect(step)
        with timer("rollout_wait"):  # the first step of a one-step-off run has nothing ahead
            return self.collect(step)

    def _score_and_select(self, collected: "Collected", timer: Timer) -> tuple[list[Sample], list[Sample], dict]:
        """Rewards and advantages of the rollout, then dynamic sampling's refills: (samples to train on,
        every sample generated, metrics)."""
        first_round, info = collected.samples, dict(collected.info)
        self.score(first_round)
        samples, generated = first_round, first_round
        if self.cfg.algo.dynamic_sampling:
            samples, generated, refills = self.dynamic_sampling(collected.step, first_round, timer)
            for key, value in refills.items():
                info[key] = info.get(key, 0.0) + value
        info.update(self._sample_stats(first_round))
        return samples, generated, info

    def _start_next_rollout(self, step: int) -> None:
        """rollout.async_steps = 1: step+1's rollout runs on the engine's current weights (version `step`)
        while this step trains; the weights are synced only once it is done, so it waits at most one step."""
        if self.cfg.rollout.async_steps and step + 1 < self.cfg.trainer.steps:
            self.next_rollout = self.rollout_thread.submit(self.collect, step + 1)

    def _finish_next_rollout(self, timer: Timer) -> None:
        if self.next_rollout is not None:
            with timer("rollout_wait"):
                self.collected = self.next_rollout.result()
            self.next_rollout = None

    def _check_staleness(self, batch: TokenBatch) -> dict:
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

    def train_step(self, step: int) -> dict:
        """One full step of the data flow; returns its metrics record (without evaluation)."""
        timer = Timer()
        started = time.perf_counter()
        collected = self._rollout_for(step, timer)
        samples, generated, info = self._score_and_select(collected, timer)  # refills use the engine: before
        self._start_next_rollout(step)  # the next step's rollout starts on it
        try:
            if samples:
                batch = self.make_batch(samples)
                staleness = self._check_staleness(batch)
                stats = self.update(batch, step, timer)
            else:  # dynamic sampling found no informative group: nothing to train on
                self.actor.version = step + 1
                staleness, stats = {}, {"train/samples_trained": 0.0}
        finally:
            self._finish_next_rollout(timer)  # before the weights change under it
        stats.update(self._overlong_stats(samples), **staleness)
        self.sync_and_record(step, generated, timer)  # replay keeps what every round generated
        seconds = dict(collected.seconds)
        for key, value in timer.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + value
        record = {"step": step + 1, **info, **stats, **self.actor.step_stats(),
                  **{f"time/{k}": v for k, v in seconds.items()}}
        for key, value in self.prefixes.step_stats(step).items():  # what dynamic sampling's refills took
            record[key] = record.get(key, 0.0) + value
        record["time/step"] = time.perf_counter() - started
        return record

    def run(self) -> dict:
        c = self.cfg
        summary = {"start_step": self.start_step}
        if self.start_step == 0:
            initial = self.evaluate(0)
            self.metrics.log({"step": 0, **initial})
            summary["initial"] = initial
        bar = tqdm(range(self.start_step, c.trainer.steps), initial=self.start_step, total=c.trainer.steps,
                   desc="SOUP" if self.n_mix else "GRPO", disable=not c.trainer.progress, dynamic_ncols=True)
        last_eval: dict = {}
        try:
            for step in bar:
                record = self.train_step(step)
                last = step + 1 == c.trainer.steps
                if last or (c.trainer.eval_interval and (step + 1) % c.trainer.eval_interval == 0):
                    started = time.perf_counter()
                    last_eval = self.evaluate(step + 1)
                    record.update(last_eval, **{"time/eval": time.perf_counter() - started})
                self.metrics.log(record)
                stop = not last and stop_asked(self.out)
                if last or stop or (step + 1) % c.trainer.save_interval == 0:
                    self.save_checkpoint(step + 1)
                bar.set_postfix(reward=f"{record['reward_mean']:.2f}",
                                acc=f"{last_eval.get('heldout/greedy_acc', float('nan')):.2f}")
                if stop:
                    log.info(f"stop requested: checkpointed step {step + 1} in {self.ckpt_root}; "
                             "the next start resumes from it")
                    summary["stopped_at"] = step + 1
                    break
        finally:
            self.close()
        summary["final"] = last_eval
        if c.trainer.plots and (self.out / "metrics.jsonl").is_file():
            summary["plot"] = str(plot_curves(self.out / "metrics.jsonl", self.out / "curves.png"))
        return summary

    def _overlong_stats(self, samples: list[Sample]) -> dict:
        """Trained responses the length limit cut, and those algo.overlong_filter kept out of the loss."""
        cut = float(sum(s.finish_reason == "length" for s in samples))
        return {"overlong/truncated": cut, "overlong/filtered": cut if self.cfg.algo.overlong_filter else 0.0}

    def _sample_stats(self, samples: list[Sample]) -> dict:
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

    def close(self) -> None:
        """End everything the run started: the prefix worker, the logs, then the runtime (servers, actor)."""
        if getattr(self, "rollout_thread", None) is not None:
            self.rollout_thread.shutdown(wait=False, cancel_futures=True)
        for part in (getattr(self, "prefixes", None), getattr(self, "metrics", None), self.runtime):
            if part is not None:
                part.close()
