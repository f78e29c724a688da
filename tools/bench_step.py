"""Step time of SOUP (defaults) against GRPO, side by side in one run on the tiny model.

Same prompts and samples per step for every variant. Steps are interleaved (GRPO step s, SOUP step s,
SOUP-without-lookahead step s, ...) so machine noise hits all variants alike; the table reports
medians over the measured steps and ratios to GRPO.

    python tools/bench_step.py --config configs/tiny_cpu.yaml --steps 12 --warmup 2 [overrides...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from soup_megatron.config import load_config
from soup_megatron.trainer import Trainer

VARIANTS = {
    "GRPO": ["soup.mix_fraction=0"],
    "SOUP": [],
    "SOUP lookahead=0": ["soup.lookahead=0"],
}
COLUMNS = ["time/step", "time/rollout", "time/prefix_wait", "time/train", "time/weight_sync", "time/history",
           "time/prefix_generate", "tokens/decoded", "tokens/prefix"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        trainers = {}
        for name, extra in VARIANTS.items():
            cfg = load_config(args.config, [*args.overrides, *extra, f"trainer.out_dir={Path(tmp) / name.replace(' ', '_')}",
                                            "trainer.tensorboard=false", "trainer.progress=false"])
            trainers[name] = Trainer(cfg)
        records: dict[str, list[dict]] = {name: [] for name in trainers}
        try:
            for step in range(args.steps):
                for name, trainer in trainers.items():
                    records[name].append(trainer.train_step(step))
                print(f"step {step + 1}/{args.steps}: " + "  ".join(
                    f"{n} {records[n][-1]['time/step']:.2f}s" for n in trainers), file=sys.stderr)
        finally:
            for trainer in trainers.values():
                trainer.close()
    medians = {name: {c: statistics.median(r.get(c, 0.0) for r in recs[args.warmup:]) for c in COLUMNS}
               for name, recs in records.items()}
    cfg = trainers["SOUP"].cfg
    table = Table(title=f"SOUP vs GRPO step time, medians of steps {args.warmup + 1}-{args.steps} "
                        f"({cfg.rollout.prompts_per_step}x{cfg.rollout.group_size} samples/step, "
                        f"mix_fraction={cfg.soup.mix_fraction}, lookahead={cfg.soup.lookahead})")
    table.add_column("variant")
    for c in COLUMNS:
        table.add_column(c.split("/")[-1])
    table.add_column("step / GRPO")
    table.add_column("decoded / GRPO")
    base = medians["GRPO"]
    for name, m in medians.items():
        table.add_row(name, *[f"{m[c]:.3f}" if c.startswith("time") else f"{m[c]:.0f}" for c in COLUMNS],
                      f"{m['time/step'] / base['time/step']:.3f}", f"{m['tokens/decoded'] / base['tokens/decoded']:.3f}")
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
