"""Benchmarks behind `soup-megatron bench` and `tools/bench_*.py`: ratios measured side by side in one run.

`step`: step time of SOUP (defaults) against GRPO on the tiny model. Same prompts and samples per step
for every variant. Steps are interleaved (GRPO step s, SOUP step s, SOUP-without-lookahead step s, ...)
so machine noise hits all variants alike; the table reports medians over the measured steps and ratios
to GRPO. The actor (megatron vs local) and rollout (SGLang vs in-process) benchmarks belong with those
backends, which this tree does not have yet.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import ConfigError, load_config
from .trainer import Trainer

STEP_VARIANTS = {
    "GRPO": ["soup.mix_fraction=0"],
    "SOUP": [],
    "SOUP lookahead=0": ["soup.lookahead=0"],
}
STEP_COLUMNS = ["time/step", "time/rollout", "time/prefix_wait", "time/train", "time/weight_sync", "time/history",
                "time/prefix_generate", "tokens/decoded", "tokens/prefix"]


def bench_step(config: str, steps: int, warmup: int, overrides: list[str]) -> Table:
    if steps <= warmup:
        raise ConfigError(f"--steps {steps} must be larger than --warmup {warmup}")
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        trainers = {}
        for name, extra in STEP_VARIANTS.items():
            cfg = load_config(config, [*overrides, *extra, f"trainer.out_dir={Path(tmp) / name.replace(' ', '_')}",
                                       "trainer.tensorboard=false", "trainer.progress=false"])
            trainers[name] = Trainer(cfg)
        records: dict[str, list[dict]] = {name: [] for name in trainers}
        try:
            for step in range(steps):
                for name, trainer in trainers.items():
                    records[name].append(trainer.train_step(step))
                print(f"step {step + 1}/{steps}: " + "  ".join(
                    f"{n} {records[n][-1]['time/step']:.2f}s" for n in trainers), file=sys.stderr)
        finally:
            for trainer in trainers.values():
                trainer.close()
    medians = {name: {c: statistics.median(r.get(c, 0.0) for r in recs[warmup:]) for c in STEP_COLUMNS}
               for name, recs in records.items()}
    cfg = trainers["SOUP"].cfg
    table = Table(title=f"SOUP vs GRPO step time, medians of steps {warmup + 1}-{steps} "
                        f"({cfg.rollout.prompts_per_step}x{cfg.rollout.group_size} samples/step, "
                        f"mix_fraction={cfg.soup.mix_fraction}, lookahead={cfg.soup.lookahead})")
    table.add_column("variant")
    for c in STEP_COLUMNS:
        table.add_column(c.split("/")[-1])
    table.add_column("step / GRPO")
    table.add_column("decoded / GRPO")
    base = medians["GRPO"]
    for name, m in medians.items():
        table.add_row(name, *[f"{m[c]:.3f}" if c.startswith("time") else f"{m[c]:.0f}" for c in STEP_COLUMNS],
                      f"{m['time/step'] / base['time/step']:.3f}", f"{m['tokens/decoded'] / base['tokens/decoded']:.3f}")
    return table


BENCHMARKS = {"step": bench_step}


def print_table(table: Table) -> None:
    Console(width=200).print(table)
