"""Per-GPU memory of a training plan (weights, gradients, optimizer state, activations, logits) and the SGLang
KV budget; exits 2 with the biggest term and what to change when the plan does not fit a GPU
(formulas and sources: `soup_megatron/planning/memory.py`).

    python tools/plan_memory.py --config configs/X.yaml [--architecture HF_CONFIG_JSON] [--world-size N]
        [--seq-len N] [--gpu-memory-gib 80] [overrides, e.g. actor.megatron.distributed_optimizer=false]
"""

import sys

from soup_megatron.planning.memory import main

if __name__ == "__main__":
    sys.exit(main())
