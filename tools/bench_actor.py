"""Tokens/s of the log-prob and training passes: megatron actor against the local actor, on the same
model and batch, in one run (see `soup_megatron/experiments/bench.py`; `soup-megatron bench` runs it too).

    python tools/bench_actor.py --config configs/tiny_cpu.yaml --steps 8 --warmup 2 [overrides...]
"""

import sys

from soup_megatron.experiments.bench import tool_main

if __name__ == "__main__":
    sys.exit(tool_main("actor", __doc__))
