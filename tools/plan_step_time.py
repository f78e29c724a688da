"""One GRPO step against one SOUP step at equal GPU count, per history placement (formulas, defaults and their
sources: `soup_megatron/planning/step_time.py`); `--validate` compares the model with a CPU `bench_step` run.

    python tools/plan_step_time.py --config configs/X.yaml [--architecture HF_CONFIG_JSON] [--prompt-len 200]
        [--mean-response 0.5] [--tau0 S] [--tau1 S] [overrides]
    python tools/bench_step.py --config configs/smollm2_135m_cpu.yaml --records step.json
    python tools/plan_step_time.py --config configs/smollm2_135m_cpu.yaml --validate step.json
"""

import sys

from soup_megatron.planning.step_time import main

if __name__ == "__main__":
    sys.exit(main())
