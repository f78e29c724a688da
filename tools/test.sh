#!/usr/bin/env bash
# Set up and run the test suite (the default tier; pass -m slow or other pytest arguments to change it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
python -m pytest -q "$@"
