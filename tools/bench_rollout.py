"""SGLang against the in-process engine (tokens/s), then SOUP against GRPO with SGLang: step time,
decoded tokens, radix-cache hits, weight-sync share of the step; side by side in one run on the tiny
model (see `soup_megatron/experiments/bench.py`). Needs the SGLang venv (`bash tools/setup_sglang.sh`).

    python tools/bench_rollout.py --config configs/tiny_cpu.yaml --steps 8 --warmup 2 [overrides...]
"""

import sys

from soup_megatron.experiments.bench import tool_main

if __name__ == "__main__":
    sys.exit(tool_main("rollout", __doc__))
