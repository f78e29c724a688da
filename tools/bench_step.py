"""Step time of SOUP (defaults) against GRPO, side by side in one run on the tiny model
(see `soup_megatron/bench.py`; `soup-megatron bench` runs it with the other benchmarks).

    python tools/bench_step.py --config configs/tiny_cpu.yaml --steps 12 --warmup 2 [overrides...]
"""

import sys

from soup_megatron.experiments.bench import tool_main

if __name__ == "__main__":
    sys.exit(tool_main("step", __doc__))
