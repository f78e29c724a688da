"""What the built-in tasks share: seeded draws of distinct problems, split into train and held-out by a
hash of the problem, so the held-out set never overlaps the training set and is the same in every style.
"""

from __future__ import annotations

import random
import zlib
from typing import Callable, Optional, TypeVar

from .prompt import DataError

Draw = TypeVar("Draw")
Kept = TypeVar("Kept")


def is_heldout(key: str) -> bool:
    """One problem in ten is held out, chosen by a hash of its key."""
    return zlib.crc32(key.encode()) % 10 == 0


def distinct_problems(task: str, split: str, size: int, seed: int, draw: Callable[[random.Random], Draw],
                      key: Callable[[Draw], str], accept: Callable[[Draw], Optional[Kept]],
                      described: str) -> list[Kept]:
    """`size` problems of the `train` or `heldout` split of `data.<task>`, in a seeded order.

    `draw` makes a candidate, `key` names it (the same key is the same problem), `accept` turns it into
    the problem kept or None to refuse it (say, unsolvable). A key is judged once: duplicates and the other
    split's problems are skipped before `accept`, which may be costly. `described` says what was asked for,
    in the error raised when too few problems are found."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{task}-{seed}-{split}")
    want_heldout = split == "heldout"
    seen: set[str] = set()
    out: list[Kept] = []
    attempts = 0
    while len(out) < size:
        attempts += 1
        if attempts > 200 * size + 1000:
            raise DataError(f"data.{task}: cannot find {size} distinct {split} problems {described}; "
                            "widen the task or ask for fewer")
        candidate = draw(rng)
        name = key(candidate)
        if name in seen or is_heldout(name) != want_heldout:
            continue
        seen.add(name)
        kept = accept(candidate)
        if kept is not None:
            out.append(kept)
    return out
