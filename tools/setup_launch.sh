#!/usr/bin/env bash
# Create (or reuse) the venv that drives runs with nemo-run (launch/): .venv-launch (about 30 s, 0.5 GB).
# The experiments submit `python -m soup_megatron.cli train` of the trainer's venv; nemo-run itself
# lives apart because its pins (older httpx, anyio) would clash with the trainer's.
# Usage: bash tools/setup_launch.sh      (LAUNCH_VENV=path to choose where; PYTHON=python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LAUNCH_VENV:-.venv-launch}
PYTHON=${PYTHON:-python3}
. tools/venv_stamp.sh
install_nemo_run() { "$1/bin/python" -m pip install -qq -r requirements-launch.txt; }
ensure_venv "$VENV" "installing nemo-run into $VENV (about 30 s)" install_nemo_run requirements-launch.txt tools/setup_launch.sh
"$VENV/bin/python" -c 'import nemo_run; print("setup_launch: nemo-run", nemo_run.__version__)'
