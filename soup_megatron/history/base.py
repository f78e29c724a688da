"""Where mixed samples get their historical trajectories (spec step 3): the protocol both
`soup.prefix_source` settings implement, so the trainer never branches on the source."""

from __future__ import annotations

import random
from typing import Optional, Protocol, Sequence

from ..sample import Sample, Trajectory


class PrefixSource(Protocol):
    def take(self, step: int) -> list[Optional[Trajectory]]:
        """One trajectory per slot planned for `step` (None: the source has none for that prompt)."""

    def take_slots(self, step: int, round: int, slots: Sequence[tuple[str, tuple[int, ...]]]
                   ) -> list[Optional[Trajectory]]:
        """One trajectory per (prompt uid, prompt ids) of `slots`, for dynamic sampling's refill `round` of
        `step`, from the history `step` sees; made on demand, a pure function of (seed, step, round, slots)."""

    def schedule(self, step: int) -> None:
        """Step `step` has its rollout: work on the steps after it may begin in the background."""

    def record(self, samples: Sequence[Sample]) -> None:
        """The step's finished samples (the replay source keeps them)."""

    def step_stats(self, step: int) -> dict[str, float]:
        """What generating step `step`'s prefixes took (tokens, time, weight loads); {} when the source
        generates nothing."""

    def wait_idle(self) -> None:
        """Return once the work `schedule` started in the background is done (the step benchmark waits for
        it, so that one variant's history generation does not run during another variant's step)."""

    def state(self) -> dict: ...

    def restore(self, state: dict) -> None: ...

    def pinned_versions(self) -> set[int]:
        """History versions this source still needs (kept by trainer checkpoints)."""

    def close(self) -> None: ...


def pick_versions(members: Sequence[int], count: int, rule: str, rng: random.Random) -> list[int]:
    """Which historical checkpoint writes each of `count` trajectories (`history.pick`)."""
    if not members:
        raise ValueError("the history pool is empty")
    if rule == "newest":
        return [max(members)] * count
    if rule == "oldest":
        return [min(members)] * count
    if rule == "uniform":
        return [rng.choice(list(members)) for _ in range(count)]
    raise ValueError(f"unknown history.pick {rule!r}")


class NoPrefixes:
    """GRPO (`soup.mix_fraction = 0`): no sample is mixed, so no historical trajectory is ever asked for."""

    def schedule(self, step: int) -> None:
        pass

    def take(self, step: int) -> list[Optional[Trajectory]]:
        return []

    def take_slots(self, step: int, round: int, slots) -> list[Optional[Trajectory]]:
        return []

    def step_stats(self, step: int) -> dict[str, float]:
        return {}

    def wait_idle(self) -> None:
        pass

    def record(self, samples: Sequence[Sample]) -> None:
        pass

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def pinned_versions(self) -> set[int]:
        return set()

    def close(self) -> None:
        pass
