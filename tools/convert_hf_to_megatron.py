"""HF checkpoint -> megatron torch_dist checkpoint (loads under any TP/PP layout afterwards).

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR [--tp N --pp M --ep E]

Starts tp x pp x ep local processes itself; under torchrun / srun it uses the launcher's ranks.
"""

import sys

from soup_megatron.mcore.convert import main

if __name__ == "__main__":
    sys.exit(main(["hf-to-megatron", *sys.argv[1:]]))
