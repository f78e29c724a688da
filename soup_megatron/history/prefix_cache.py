"""`prefix_source = checkpoint`: historical trajectories generated ahead of the trainer.

Historical weights are fixed, so the trajectories for step t can be written while the trainer is
still on step t - lookahead. A worker process holds the history engines, loads the checkpoints it is
asked for from the history store, and fills one job at a time, in order.

Jobs: a job covers `soup.history_steps_per_call` consecutive steps, so each of its versions is one
generation call for all those steps (a call pays its longest trajectory once) and one weight load at
most. With SGLang every history server is an engine of its own that keeps the version it last loaded:
a job's versions are spread over the servers (`place_versions`), which generate in parallel.

Scheduling: the trainer calls `schedule(t)` once step t's on-policy rollout is done, so the worker
generates for steps t+1 .. t+lookahead while the trainer computes gradients (on a small machine the
two would otherwise compete for the same cores during rollout). A step nobody generated ahead
(the first one, or lookahead = 0) is generated when `take` asks for it.

Determinism (a resumed run must match an uninterrupted one): each job carries the pool as it was
when the job was created (the snapshot; the pool only changes at the end of a step) and a seed
derived from (seed, its first step); both are saved in trainer checkpoints with the job's steps, so a
resumed run regenerates exactly the same trajectories (and drops those of steps already taken).
Every version a job may read is pinned in the store until its last step is taken.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
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
    """The historical trajectories of consecutive steps, generated together: one generation call per version."""

    steps: list  # step numbers, or one refill key (`take_slots`)
    uids: list[str]  # the slots of every step, step after step
    prompt_ids: list[tuple[int, ...]]
    versions: list[int]
    paths: dict[int, str]
    max_new_tokens: int
    temperature: float
    seed: int


@dataclass
class JobResult:
    first_step: int
    trajectories: Optional[list[Trajectory]]
    seconds: float
    loads: int  # weight loads the job needed (versions no engine held)
    error: Optional[str] = None


def _history_engines(rollout: RolloutConfig, run_dir: Optional[str], path: str, version: int) -> list:
    """One engine per history server (SGLang: each keeps the version it last loaded), one in-process engine else."""
    if rollout.backend != "sglang":
        return [build_engine(rollout, path, version, run_dir, group="history")]
    from ..rollout.sglang_servers import read_address_file

    urls = read_address_file(Path(run_dir) / "servers" / "history.json")["urls"]
    return [build_engine(rollout, path, version, run_dir, group="history", server=i) for i in range(len(urls))]


def place_versions(held: Sequence[Optional[int]], versions: Sequence[int]) -> list[list[int]]:
    """Which versions each engine generates, in order: a version an engine already holds stays there; the
    others go, fewest first, to engines whose version this job does not need (held ones keep their weights
    for as long as possible), so each version is loaded at most once per job and engines work in parallel."""
    todo = sorted(set(versions))
    plan: list[list[int]] = [[] for _ in held]
    for i, v in enumerate(held):
        if v in todo:
            plan[i].append(v)
            todo.remove(v)
    for v in todo:
        i = min(range(len(held)), key=lambda e: (len(plan[e]), held[e] in versions, e))
        plan[i].append(v)
    return plan


def _generate_on(engine, versions: list[int], job: PrefixJob, out: list) -> int:
    """Generate every slot of `versions` on one engine; returns the weight loads it needed."""
    loads = 0
    for version in versions:
        if engine.version != version:
            engine.load_weights(Path(job.paths[version]), version)
            loads += 1
        rows = [i for i, v in enumerate(job.versions) if v == version]
        # every version's generation has its own seed, so neither order nor engine changes a trajectory
        gens = engine.generate([GenerationRequest(job.prompt_ids[i], (), job.max_new_tokens) for i in rows],
                               job.temperature, job.seed + version)
        for i, g in zip(rows, gens):
            out[i] = Trajectory(job.uids[i], g.token_ids, g.logprobs, [version] * len(g.token_ids),
                                g.finish_reason == "stop")
    return loads


def _worker(rollout: RolloutConfig, run_dir: Optional[str], jobs: mp.Queue, results: mp.Queue) -> None:
    import torch

    if rollout.threads:
        torch.set_num_threads(rollout.threads)
    engines: list = []
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
            if not engines:
                first = min(job.versions)
                engines = _history_engines(rollout, run_dir, job.paths[first], first)
            out: list[Optional[Trajectory]] = [None] * len(job.uids)
            plan = place_versions([e.version for e in engines], job.versions)
            busy = [(e, vs) for e, vs in zip(engines, plan) if vs]
            if len(busy) == 1:
                loads = _generate_on(busy[0][0], busy[0][1], job, out)
            else:  # SGLang servers generate their versions at the same time
                with ThreadPoolExecutor(len(busy)) as pool:
                    loads = sum(pool.map(lambda ev: _generate_on(ev[0], ev[1], job, out), busy))
            results.put(JobResult(job.steps[0], out, time.perf_counter() - started, loads))
        except Exception:
            results.put(JobResult(job.steps[0], None, 0.0, 0, traceback.format_exc()))


class PrefixCache:
    def __init__(self, store: CheckpointStore, plan: Plan, *, lookahead: int, pick: str, seed: int,
                 max_new_tokens: int, temperature: float, rollout: RolloutConfig, run_dir: Optional[str] = None,
                 steps_per_call: int = 1):
        self.store, self.plan, self.lookahead, self.pick, self.seed = store, plan, lookahead, pick, seed
        self.max_new_tokens, self.temperature, self.steps_per_call = max_new_tokens, temperature, steps_per_call
        ctx = mp.get_context("spawn")
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_worker, args=(rollout, run_dir, self._jobs, self._results),
                                 name="soup-prefix-worker", daemon=True)
        self._proc.start()
        # job (its first step) -> (its steps, the pool snapshot, picked versions); steps still to be taken
        self._pending: dict[int, tuple[list[int], list[int], list[int]]] = {}
        self._wanted: dict[int, int] = {}  # step -> its job
        self._done: dict[int, list[Trajectory]] = {}
        self.generation_seconds: dict[int, float] = {}  # a job's time, shared evenly by its steps
        self.weight_loads: dict[int, float] = {}
        self._prompt_tokens: dict = {}  # step (or refill key) -> prompt tokens its slots prefill
        self._work: dict = {}  # step -> what the history engines did for it (`step_stats`)

    def _submit(self, steps: list, snapshot: list[int], wanted: Optional[list[int]] = None,
                refill_slots=None) -> None:
        """A job for `steps`: their planned slots, or `refill_slots` for a single refill key."""
        uids, prompt_ids, versions = [], [], []
        for step in steps:  # each step keeps its own picks: a job of several steps changes no trajectory's version
            slots = self.plan(step) if refill_slots is None else refill_slots
            self._prompt_tokens[step] = sum(len(p) for _, p in slots)
            uids += [u for u, _ in slots]
            prompt_ids += [p for _, p in slots]
            versions += pick_versions(snapshot, len(slots), self.pick, random.Random(f"pick-{self.seed}-{step}"))
        first = steps[0]
        self.store.pin(f"prefix-{first}", versions)
        self._pending[first] = (list(steps), list(snapshot), versions)
        for step in wanted if wanted is not None else steps:
            self._wanted[step] = first
        self._jobs.put(PrefixJob(
            steps=list(steps), uids=uids, prompt_ids=prompt_ids, versions=versions,
            paths={v: str(self.store.path(v)) for v in set(versions)},
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            seed=random.Random(f"prefix-{self.seed}-{first}").randrange(2**31)))

    def _covered(self, step: int) -> bool:
        return step in self._wanted or step in self._done

    def _submit_from(self, step: int) -> None:
        """A job of up to steps_per_call consecutive steps not yet covered, starting at `step`."""
        steps = [step]
        while len(steps) < self.steps_per_call and not self._covered(steps[-1] + 1):
            steps.append(steps[-1] + 1)
        self._submit(steps, self.store.members())

    def schedule(self, step: int) -> None:
        """Submit jobs so that steps step+1 .. step+lookahead are all covered."""
        for t in range(step + 1, step + self.lookahead + 1):
            if not self._covered(t):
                self._submit_from(t)

    def _receive(self, timeout: float) -> bool:
        """Collect one finished job; False when none arrived within `timeout`."""
        try:
            result: JobResult = self._results.get(timeout=timeout)
        except queue.Empty:
            if not self._proc.is_alive():
                raise RuntimeError(f"the prefix worker died (exit code {self._proc.exitcode}) with steps "
                                   f"{sorted(self._wanted)} pending") from None
            return False
        if result.error:
            raise RuntimeError(f"prefix generation for step {result.first_step} failed in the worker:\n"
                               f"{result.error}")
        steps = self._pending[result.first_step][0]
        per_step = len(result.trajectories) // len(steps)
        for j, step in enumerate(steps):
            if self._wanted.get(step) == result.first_step:  # a resumed job regenerates steps already taken
                self._done[step] = result.trajectories[j * per_step: (j + 1) * per_step]
                self.generation_seconds[step] = result.seconds / len(steps)
                self.weight_loads[step] = result.loads / len(steps)
        return True

    def ready_steps(self) -> set[int]:
        """Steps whose prefixes are already generated (collects finished jobs without waiting)."""
        while self._receive(timeout=0.01):
            pass
        return set(self._done)

    def wait_idle(self) -> None:
        """Until every job submitted so far has come back from the worker."""
        while any(step not in self._done for step in self._wanted):
            self._receive(timeout=1.0)

    def take(self, step: int) -> list[Optional[Trajectory]]:
        if not self._covered(step):  # not generated ahead: on the critical path
            self._submit_from(step)
        while step not in self._done:
            self._receive(timeout=1.0)
        first = self._wanted.pop(step)
        if first not in self._wanted.values():  # the job's last step: its versions may rotate out
            self._pending.pop(first)
            self.store.unpin(f"prefix-{first}")
        trajectories = self._done.pop(step)
        self._work[step] = self._history_work(step, trajectories)
        return trajectories

    def _history_work(self, key, trajectories: list[Trajectory]) -> dict[str, float]:
        """What the history engines did for `key`: prompt tokens prefilled, tokens decoded, and decode steps
        (a version's generation call is as long as its longest trajectory), and its time and weight loads."""
        longest: dict[int, int] = {}
        for t in trajectories:
            if t is not None and t.token_ids:
                longest[t.versions[0]] = max(longest.get(t.versions[0], 0), len(t.token_ids))
        return {"tokens/history_prefilled": float(self._prompt_tokens.pop(key, 0)),
                "tokens/history_decoded": float(sum(len(t.token_ids) for t in trajectories if t is not None)),
                "tokens/history_decode_steps": float(sum(longest.values())),
                "history/versions_generated": float(len(longest)),
                "time/prefix_generate": self.generation_seconds.pop(key, 0.0),
                "history/weight_loads": self.weight_loads.pop(key, 0.0)}

    def step_stats(self, step: int) -> dict[str, float]:
        return self._work.pop(step, {})

    def take_slots(self, step: int, round: int, slots) -> list[Optional[Trajectory]]:
        """Generated now, after the jobs already queued (a refill is not known ahead), with the pool as it is
        during `step`; taken before the step ends, so a checkpoint never holds it."""
        key = f"{step}-refill-{round}"
        self._submit([key], self.store.members(), refill_slots=list(slots))
        out = self.take(key)
        totals = self._work.setdefault(step, {})
        for name, value in self._work.pop(key).items():  # the refill's work counts for its step
            totals[name] = totals.get(name, 0.0) + value
        return out

    def record(self, samples: Sequence[Sample]) -> None:
        pass  # historical checkpoints, not past rollouts, write these prefixes

    def state(self) -> dict:
        return {"jobs": [{"steps": steps, "snapshot": snapshot,
                          "wanted": sorted(t for t, f in self._wanted.items() if f == first)}
                         for first, (steps, snapshot, _) in sorted(self._pending.items())]}

    def restore(self, state: dict) -> None:
        for job in state.get("jobs", []):
            self._submit(job["steps"], job["snapshot"], job["wanted"])
        # checkpoints written before jobs of several steps: one snapshot per pending step
        for t, snapshot in sorted((int(t), s) for t, s in state.get("pending", {}).items()):
            self._submit([t], snapshot)

    def pinned_versions(self) -> set[int]:
        """Versions the pending jobs read (a trainer checkpoint must keep them to resume)."""
        return {v for _, _, versions in self._pending.values() for v in versions}

    def close(self) -> None:
        if self._proc.is_alive():
            self._jobs.put(None)
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=5)
