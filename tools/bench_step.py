"""Step time of SOUP (defaults) against GRPO, side by side in one run on the tiny model
(see `soup_megatron/bench.py`; `soup-megatron bench` runs it with the other benchmarks).

    python tools/bench_step.py --config configs/tiny_cpu.yaml --steps 12 --warmup 2 [overrides...]
"""

from __future__ import annotations

import argparse
import sys

from soup_megatron.bench import bench_step, print_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    print_table(bench_step(args.config, args.steps, args.warmup, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
