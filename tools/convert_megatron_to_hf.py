"""Megatron checkpoint (converted, or a training checkpoint's actor/) -> HF checkpoint directory.

    python tools/convert_megatron_to_hf.py --megatron DIR --out DIR [--hf-template DIR] [--tp N] [--ep E]

The weights are gathered one tensor at a time and written as safetensors shards with an index.
"""

import sys

from soup_megatron.mcore.convert import main

if __name__ == "__main__":
    sys.exit(main(["megatron-to-hf", *sys.argv[1:]]))
