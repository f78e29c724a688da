"""Step time of SOUP (defaults) and its cost options against GRPO, steps interleaved in one run, each ratio
with a 95% bootstrap interval over the paired steps; the policy frozen and every sample trained unless
--learning (see `soup_megatron/experiments/bench.py`; `soup-megatron bench` runs it with the other benchmarks).

    python tools/bench_step.py --config configs/tiny_cpu.yaml --steps 12 --warmup 2 [--target-ci 0.05]
        [--max-steps 48] [--variant NAME ...] [--records FILE.json] [overrides...]
"""

import sys

from soup_megatron.experiments.bench import tool_main

if __name__ == "__main__":
    sys.exit(tool_main("step", __doc__))
