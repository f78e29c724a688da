"""`prefix_source = checkpoint`: historical trajectories generated ahead of the trainer.

Historical weights are fixed, so the trajectories for step t can be written while the trainer is
still on step t - lookahead. A worker process holds its own rollout engine, loads the checkpoints
it is asked for from the history store, and fills one job per step in order.

Scheduling: the trainer calls `schedule(t)` once step t's on-policy rollout is done, so the worker
generates for steps t+1 .. t+lookahead while the trainer computes gradients (on a small machine the
two would otherwise compete for the same cores during rollout). A step nobody generated ahead
(the first one, or lookahead = 0) is generated when `take` asks for it.

Determinism (a resumed run must match an uninterrupted one): each job carries the pool as it was
when the job was created (the snapshot; the pool only changes at the end of a step) and a seed
derived from (seed, t); both are saved in trainer checkpoints, so a resumed run regenerates exactly
the same trajectories. Every version a job may read is pinned in the store until the job is taken.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..config import RolloutConfig
from ..rollout import build_engine
from ..rollout.base import GenerationRequest
from ..sample import Sample, Trajectory
from .base import pick_versions
from .store import CheckpointStore

# slots planned for a step: (prompt uid, prompt token ids), one per historical trajectory needed
Plan = Callable[[int], list[tuple[str, tuple[int, ...]]]]


@dataclass
class PrefixJob:
    step: int
    uids: list[str]
    prompt_ids: list[tuple[int, ...]]
    versions: list[int]
    paths: dict[int, str]
    max_new_tokens: int
    temperature: float
    seed: int


def _worker(rollout: RolloutConfig, run_dir: Optional[str], jobs: mp.Queue, results: mp.Queue) -> None:
    import torch

    if rollout.threads:
        torch.set_num_threads(rollout.threads)
    engine = None
    parent = os.getppid()
    while True:
        try:
            job: Optional[PrefixJob] = jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the trainer died without closing us: nobody will take our results
                return
            continue
        if job is None:
            return
        try:
            started = time.perf_counter()
            out: list[Optional[Trajectory]] = [None] * len(job.uids)
            # the loaded version first: each switch is a weight reload (on SGLang, a disk load and cache flush);
            # every version's generation has its own seed, so the order does not change any trajectory
            current = engine.version if engine is not None else None
            for version in sorted(set(job.versions), key=lambda v: (v != current, v)):
                if engine is None:
                    engine = build_engine(rollout, job.paths[version], version, run_dir, group="history")
                if engine.version != version:
                    engine.load_weights(Path(job.paths[version]), version)
                rows = [i for i, v in enumerate(job.versions) if v == version]
                gens = engine.generate(
                    [GenerationRequest(job.prompt_ids[i], (), job.max_new_tokens) for i in rows],
                    job.temperature, job.seed + version)
                for i, g in zip(rows, gens):
                    out[i] = Trajectory(job.uids[i], g.token_ids, g.logprobs, [version] * len(g.token_ids),
                                        g.finish_reason == "stop")
            results.put((job.step, out, time.perf_counter() - started, None))
        except Exception:
            results.put((job.step, None, 0.0, traceback.format_exc()))


class PrefixCache:
    def __init__(self, store: CheckpointStore, plan: Plan, *, lookahead: int, pick: str, seed: int,
                 max_new_tokens: int, temperature: float, rollout: RolloutConfig, run_dir: Optional[str] = None):
        self.store, self.plan, self.lookahead, self.pick, self.seed = store, plan, lookahead, pick, seed
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        ctx = mp.get_context("spawn")
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_worker, args=(rollout, run_dir, self._jobs, self._results),
                                 name="soup-prefix-worker", daemon=True)
        self._proc.start()
        self._pending: dict[int, tuple[list[int], list[int]]] = {}  # step -> (snapshot, picked versions)
        self._done: dict[int, list[Trajectory]] = {}
        self.generation_seconds: dict[int, float] = {}

    def _submit(self, step: int, snapshot: list[int]) -> None:
        slots = self.plan(step)
        versions = pick_versions(snapshot, len(slots), self.pick, random.Random(f"pick-{self.seed}-{step}"))
        self.store.pin(f"prefix-{step}", versions)
        self._pending[step] = (list(snapshot), versions)
        self._jobs.put(PrefixJob(
            step=step, uids=[u for u, _ in slots], prompt_ids=[p for _, p in slots],
            versions=versions, paths={v: str(self.store.path(v)) for v in set(versions)},
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            seed=random.Random(f"prefix-{self.seed}-{step}").randrange(2**31)))

    def schedule(self, step: int) -> None:
        """Submit the lookahead jobs (steps step+1 .. step+lookahead) not yet submitted."""
        for t in range(step + 1, step + self.lookahead + 1):
            if t not in self._pending and t not in self._done:
                self._submit(t, self.store.members())

    def _receive(self, timeout: float) -> bool:
        """Collect one finished job; False when none arrived within `timeout`."""
        try:
            done_step, trajs, seconds, error = self._results.get(timeout=timeout)
        except queue.Empty:
            if not self._proc.is_alive():
                raise RuntimeError(f"the prefix worker died (exit code {self._proc.exitcode}) with steps "
                                   f"{sorted(self._pending)} pending") from None
            return False
        if error:
            raise RuntimeError(f"prefix generation for step {done_step} failed in the worker:\n{error}")
        self._done[done_step] = trajs
        self.generation_seconds[done_step] = seconds
        return True

    def ready_steps(self) -> set[int]:
        """Steps whose prefixes are already generated (collects finished jobs without waiting)."""
        while self._receive(timeout=0.01):
            pass
        return set(self._done)

    def take(self, step: int) -> list[Optional[Trajectory]]:
        if step not in self._pending and step not in self._done:  # not generated ahead: on the critical path
            self._submit(step, self.store.members())
        while step not in self._done:
            self._receive(timeout=1.0)
        self._pending.pop(step, None)
        self.store.unpin(f"prefix-{step}")
        return self._done.pop(step)

    def record(self, samples: Sequence[Sample]) -> None:
        pass  # historical checkpoints, not past rollouts, write these prefixes

    def state(self) -> dict:
        return {"pending": {str(t): snapshot for t, (snapshot, _) in sorted(self._pending.items())}}

    def restore(self, state: dict) -> None:
        for t, snapshot in sorted((int(t), s) for t, s in state.get("pending", {}).items()):
            self._submit(t, snapshot)

    def pinned_versions(self) -> set[int]:
        """Versions the pending jobs read (a trainer checkpoint must keep them to resume)."""
        return {v for _, versions in self._pending.values() for v in versions}

    def close(self) -> None:
        if self._proc.is_alive():
            self._jobs.put(None)
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=5)
