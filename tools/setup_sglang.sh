#!/usr/bin/env bash
# Create (or reuse) the SGLang server venv for CPU runs and tests: .venv-sglang (about 90 s, 3 GB).
# SGLang's servers run in their own interpreter; the trainer only talks HTTP to them.
# Usage: bash tools/setup_sglang.sh      (SGLANG_VENV=path to choose where; PYTHON=python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SGLANG_VENV:-.venv-sglang}
PYTHON=${PYTHON:-python3}
. tools/venv_stamp.sh
install_sglang() {
  "$1/bin/python" -m pip install -qq --no-deps -r requirements-sglang.txt
  # their declared requirements are CUDA builds (torch 2.14.1, flashinfer, ...): none are needed on CPU
  "$1/bin/python" -m pip install -qq --no-deps sglang==0.5.23 torchvision==0.28.0
}
ensure_venv "$VENV" "installing SGLang 0.5.23 for CPU into $VENV (about 90 s)" install_sglang \
  requirements-sglang.txt tools/setup_sglang.sh
PYTHONPATH=soup_megatron/rollout/sglang_pythonpath SOUP_SGLANG_SHIMS=1 "$VENV/bin/python" -c \
  'import sglang, torch, torchvision; print("setup_sglang: sglang", sglang.__version__, "| torch", torch.__version__)'
