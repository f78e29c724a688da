#!/usr/bin/env bash
# The tiny SOUP demo on one CPU machine: set up, build + SFT the tiny model, train SOUP, show before/after.
# Usage: bash tools/demo.sh [dotted overrides...]     e.g. bash tools/demo.sh seed=2 trainer.steps=40
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
soup-megatron prepare --config configs/tiny_cpu.yaml "$@"
soup-megatron train --config configs/tiny_cpu.yaml "$@"
