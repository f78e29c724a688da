"""The SOUP training loop. Each step runs the data flow's stages, each a unit of its own:

    collect.py   prompts -> prefix (historical policy) -> continuation (rollout engine) -> reward -> advantage,
                 dynamic sampling's refills, and the one-step-off rollout that runs ahead
    update.py    token tensors -> old log-probs -> token-ratio loss, PPO epochs
    here         weight sync -> history (the pool of historical checkpoints, the prefix source's records)
    checkpointing.py  everything needed to continue, written atomically

GRPO (`soup.mix_fraction = 0`) and trajectory-level mixing (`soup.mode = trajectory`) run through the
same code. Every random choice is derived from (seed, step), and a trainer checkpoint holds weights,
optimizer, history pool, pending prefix jobs, the replay buffer and the rollout collected ahead, so a run
killed at any point and resumed reaches the same state as an uninterrupted one.

One-step-off rollout (`rollout.async_steps = 1`): step n+1's rollout runs on the engine's weights of
version n while step n trains, and the weights are synced only after it is done, so at step n+1's update
(actor version n+1) every continuation token is exactly one version old (`staleness/*`; an older one is
refused). How the loss treats that lag: update.py.
"""

from __future__ import annotations

import json
import shutil
import time

from tqdm import tqdm

from ..algo.mixing import history_length, mixed_count
from ..config import Config, changed_keys, to_container, to_yaml
from ..data.encoding import PromptFormat
from ..data.prompts import load_splits
from ..evaluate import heldout_metrics
from ..history.base import NoPrefixes, PrefixSource
from ..history.prefix_cache import PrefixCache
from ..history.replay import ReplayBuffer
from ..history.store import CheckpointStore
from ..io import atomic_write_text, make_private_dir
from ..log import get_logger
from ..metrics import MetricsLog, WandbSettings, plot_curves
from ..model.hf import load_tokenizer, newline_token_ids, pad_token_id
from ..reward import build_reward
from ..sample import Sample
from .checkpointing import TrainerCheckpoints
from .collect import Collector, StepPrompts
from .runtime import Runtime
from .shutdown import refuse_restart_without_checkpoints, stop_asked
from .stage import Timer, step_seed
from .update import Updater

log = get_logger(__name__)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = make_private_dir(cfg.trainer.out_dir)  # checkpoints and server keys: the user's own
        refuse_restart_without_checkpoints(self.out / "checkpoints")
        self.checkpoints = TrainerCheckpoints(self.out / "checkpoints", cfg.trainer.keep_checkpoints)
        self.train_prompts, self.heldout = load_splits(cfg.data, cfg.seed)  # cheap checks of inputs first
        self.reward_fn = build_reward(cfg.reward)
        tokenizer = load_tokenizer(cfg.model.path)
        self.format = PromptFormat.of(tokenizer, cfg.data, cfg.model.path)
        self.n_mix = mixed_count(cfg.rollout.group_size, cfg.soup.mix_fraction)
        # historical trajectories per prompt: mixed sample j is cut from trajectory j mod n_hist
        shared = cfg.soup.mode == "token" and cfg.soup.history_per_prompt > 0
        n_hist = min(cfg.soup.history_per_prompt, self.n_mix) if shared else self.n_mix
        self.prompts = StepPrompts(cfg, self.train_prompts, self.format, n_hist)

        self.runtime = Runtime(cfg, self.out, bool(self.n_mix) and cfg.soup.prefix_source == "checkpoint")
        rt = self.runtime
        self.actor, self.engine, self.weight_sync = rt.actor, rt.engine, rt.weight_sync
        self.updater = Updater(cfg, self.actor, pad_token_id(tokenizer), rt.ref_engine)
        self.prefixes, self.collector, self.metrics = NoPrefixes(), None, None  # until built (close() may run before)
        try:
            self._build_pipeline(cfg, newline_token_ids(tokenizer) if cfg.soup.cut_at == "line" else frozenset())
        except BaseException:
            self.close()
            raise

    def _build_pipeline(self, cfg: Config, newline_ids: frozenset[int]) -> None:
        """History (fresh or resumed), prefix source, the collect stage, logs."""
        self.start_step = 0
        latest = self.checkpoints.latest()
        resumed = None
        if latest is not None:
            if (self.out / "config.yaml").is_file():
                for change in changed_keys(self.out / "config.yaml", cfg):  # legitimate (more steps) or not
                    log.warning(f"resuming {self.out} with a changed config: {change}")
            self.store = CheckpointStore(self.out / "history", cfg.history.keep)
            resumed = self.checkpoints.load(latest, self.actor, self.store)
            self.weight_sync(self.actor.version)
            self.start_step = resumed.step
        else:  # a fresh run; history a crash left before the first trainer checkpoint is not ours to reuse
            shutil.rmtree(self.out / "history", ignore_errors=True)
            self.store = CheckpointStore(self.out / "history", cfg.history.keep)
            self.store.add(0, self.actor.save_hf)  # the initial policy is the first member of H
        self.prefixes = self._build_prefix_source()
        self.collector = Collector(cfg, self.prompts, self.engine, self.prefixes, self.reward_fn, self.n_mix,
                                   newline_ids, self.runtime.colocated_history)
        if resumed is not None:
            self.prefixes.restore(resumed.prefixes)
            self.collector.ahead = resumed.ahead  # one-step-off: the next step's samples, already generated
        wandb = None
        if cfg.trainer.wandb != "off":
            wandb = WandbSettings(cfg.trainer.wandb, cfg.trainer.wandb_project,
                                  cfg.trainer.wandb_run_name or self.out.name, to_container(cfg))
        self.metrics = MetricsLog(self.out, cfg.trainer.tensorboard, self.start_step, wandb)
        atomic_write_text(self.out / "config.yaml", to_yaml(cfg))
        self.record_placement()

    def record_placement(self) -> None:
        """Where this start of the run runs, a line each start in `placement.jsonl`: every trainer rank's host and
        layout ranks, and the URLs of its server groups (a multi-node run's own record of its layout)."""
        servers = self.runtime.servers
        groups = {name: group.urls for name, group in servers.groups.items()} if servers else {}
        line = {"start_step": self.start_step, "trainer": self.actor.places, "servers": groups}
        with open(self.out / "placement.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")

    def _build_prefix_source(self) -> PrefixSource:
        c = self.cfg
        if self.n_mix == 0:
            return NoPrefixes()
        if c.soup.prefix_source == "replay":
            return ReplayBuffer(self.prompts.history_slots, c.soup.replay_per_prompt, c.seed)
        return PrefixCache(self.store, self.prompts.history_slots, lookahead=c.soup.lookahead, pick=c.history.pick,
                           seed=c.seed,
                           max_new_tokens=history_length(c.rollout.max_response_len, c.soup.cut_max, c.soup.cut_of),
                           temperature=c.rollout.temperature, rollout=c.rollout, run_dir=str(self.out),
                           steps_per_call=c.soup.history_steps_per_call)

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """One full step of the data flow; returns its metrics record (without evaluation)."""
        timer = Timer()
        started = time.perf_counter()
        collected = self.collector.take(step, timer)
        samples, generated, info = self.collector.score_and_select(collected, timer)  # refills use the engine
        self.collector.start_ahead(step)  # the next step's rollout starts on it, while this step trains
        try:
            stats = self.updater.train(samples, step, timer)
        finally:
            self.collector.finish_ahead(timer)  # before the weights change under it
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

    def sync_and_record(self, step: int, samples: list[Sample], timer: Timer) -> None:
        """Weight sync to the rollout engine, then history: a new member every history.interval steps, and
        the step's samples to the prefix source (replay keeps them)."""
        with timer("weight_sync"):
            self.weight_sync(self.actor.version)
        with timer("history"):
            if (step + 1) % self.cfg.history.interval == 0:
                self.store.add(step + 1, self.actor.save_hf)
            self.prefixes.record(samples)

    def evaluate(self, step: int) -> dict:
        """Held-out greedy accuracy, sampled pass@1 and, with trainer.eval_pass_k, pass@k and distinct correct
        solutions of the current policy (the on-policy engine)."""
        c = self.cfg
        return heldout_metrics(self.engine, self.format, self.heldout, self.reward_fn,
                               max_new_tokens=c.rollout.max_response_len, temperature=c.rollout.temperature,
                               pass_samples=c.trainer.eval_pass_samples, seed=step_seed(c.seed, step, "eval"),
                               pass_ks=c.trainer.eval_pass_k)

    def save_checkpoint(self, step: int) -> None:
        self.checkpoints.save(step, self.actor, self.store, self.prefixes, self.collector.ahead)

    # ---- the loop ------------------------------------------------------------------------------
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
                    log.info(f"stop requested: checkpointed step {step + 1} in {self.checkpoints.root}; "
                             "the next start resumes from it")
                    summary["stopped_at"] = step + 1
                    break
        finally:
            self.close()
        summary["final"] = last_eval
        if c.trainer.plots and (self.out / "metrics.jsonl").is_file():
            summary["plot"] = str(plot_curves(self.out / "metrics.jsonl", self.out / "curves.png"))
        return summary

    def close(self) -> None:
        """End everything the run started: the rollout thread, the prefix worker, the logs, then the runtime
        (servers, actor)."""
        for part in (self.collector, self.prefixes, self.metrics, self.runtime):
            if part is not None:
                part.close()
