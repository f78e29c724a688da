"""Prompts: the rows a run trains and evaluates on, from local JSONL / Parquet or a built-in task.

A malformed row is refused with the file, the line (row) and the field named. The order prompts are
drawn in is a pure function of (seed, step), so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from ..config import DataConfig
from . import arithmetic, countdown
from .prompt import DataError, Prompt


def read_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, row) pairs; line numbers are 1-based file lines for JSONL, row numbers for Parquet."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{path}: cannot read Parquet: {exc}") from None
        return list(enumerate(table.to_pylist(), start=1))
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: expected a .jsonl or .parquet file")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def field_text(path: Path, lineno: int, row: object, name: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected an object with field '{name}', got {type(row).__name__}")
    if name not in row:
        raise DataError(f"{path}:{lineno}: missing field '{name}' (row has: {', '.join(map(str, row)) or 'nothing'})")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{path}:{lineno}: field '{name}' must be a string or a number, got {type(value).__name__}")
    # AMC files store answers as floats (70.0): whole numbers are written as integers
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if not text.strip():
        raise DataError(f"{path}:{lineno}: field '{name}' is empty")
    return text


def load_file(path: str | Path, prompt_field: str, answer_field: str, template: str = "{prompt}") -> list[Prompt]:
    path = Path(path)
    prompts = []
    for lineno, row in read_rows(path):
        text = field_text(path, lineno, row, prompt_field)
        answer = field_text(path, lineno, row, answer_field)
        prompts.append(Prompt(uid=f"{path.name}:{lineno}", text=template.replace("{prompt}", text), answer=answer))
    if not prompts:
        raise DataError(f"{path}: no rows")
    return prompts


def builtin_split(cfg: DataConfig, split: str, size: int, seed: int) -> list[Prompt]:
    """A split of the built-in task `data.source` names, before data.template lays its prompts out; its
    problems are drawn with data.problems_seed, or with the run's `seed` when that is None."""
    seed = seed if cfg.problems_seed is None else cfg.problems_seed
    if cfg.source == "countdown":
        return countdown.make_split(split, size, seed, cfg.countdown)
    a = cfg.arithmetic
    return arithmetic.make_split(split, size, seed, a.min_terms, a.max_terms, a.max_operand, a.style)


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, heldout) prompts for a run."""
    if cfg.source == "file":
        return (load_file(cfg.train_path, cfg.prompt_field, cfg.answer_field, cfg.template),
                load_file(cfg.heldout_path, cfg.prompt_field, cfg.answer_field, cfg.template))
    return tuple(  # type: ignore[return-value]
        [Prompt(p.uid, cfg.template.replace("{prompt}", p.text), p.answer)
         for p in builtin_split(cfg, split, size, seed)]
        for split, size in (("train", cfg.train_size), ("heldout", cfg.heldout_size))
    )


def prompts_for_step(prompts: list[Prompt], step: int, batch: int, seed: int) -> list[Prompt]:
    """The `batch` prompts of training step `step` (0-based): epochs of seeded permutations, concatenated."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(pos, len(prompts))
        out.append(prompts[_epoch_order(len(prompts), seed, epoch)[offset]])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"order-{seed}-{epoch}").shuffle(order)
    return tuple(order)
