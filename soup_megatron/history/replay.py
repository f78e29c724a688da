"""`prefix_source = replay`: stored past rollouts of the same prompt from earlier steps.

Each stored trajectory keeps the per-token behaviour log-probs and versions it was written with, so
a replayed prefix carries exact provenance. A prompt not yet seen has nothing to replay: its slot
comes back as None and the trainer makes that sample an ordinary on-policy one, counted in the
`mix/replay_misses` metric (with the built-in task every prompt recurs once per epoch).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Optional, Sequence

from ..sample import Sample, Trajectory
from .prefix_cache import Plan


class ReplayBuffer:
    def __init__(self, plan: Plan, per_prompt: int, seed: int):
        self.plan, self.per_prompt, self.seed = plan, per_prompt, seed
        self._by_prompt: "OrderedDict[str, list[Trajectory]]" = OrderedDict()

    def schedule(self, step: int) -> None:
        pass  # nothing to prepare: replays are drawn when the step takes them

    def take(self, step: int) -> list[Optional[Trajectory]]:
        return self._draw(f"{step}", self.plan(step))

    def take_slots(self, step: int, round: int, slots) -> list[Optional[Trajectory]]:
        return self._draw(f"{step}-refill-{round}", slots)

    def step_stats(self, step: int) -> dict[str, float]:
        return {}  # past rollouts: nothing is generated

    def wait_idle(self) -> None:
        pass  # nothing runs in the background

    def _draw(self, key: str, slots) -> list[Optional[Trajectory]]:
        rng = random.Random(f"replay-{self.seed}-{key}")
        return [rng.choice(self._by_prompt[uid]) if self._by_prompt.get(uid) else None for uid, _ in slots]

    def record(self, samples: Sequence[Sample]) -> None:
        for sample in samples:
            kept = self._by_prompt.setdefault(sample.prompt.uid, [])
            kept.append(sample.response_trajectory())
            del kept[: -self.per_prompt]

    def state(self) -> dict:
        return {"by_prompt": {uid: [t.__dict__ for t in trajs] for uid, trajs in self._by_prompt.items()}}

    def restore(self, state: dict) -> None:
        self._by_prompt = OrderedDict(
            (uid, [Trajectory(**t) for t in trajs]) for uid, trajs in state.get("by_prompt", {}).items())

    def pinned_versions(self) -> set[int]:
        return set()  # replays hold their tokens and log-probs, not checkpoints

    def close(self) -> None:
        pass
