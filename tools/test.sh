#!/usr/bin/env bash
# Set up and run the test suite (the default tier; pass -m slow or other pytest arguments to change it).
# Tests start real SGLang servers on CPU from the SGLang venv; any a failed test left behind are
# stopped by PID on the way out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
bash tools/setup_sglang.sh
launcher="$PWD/soup_megatron/rollout/sglang_pythonpath/soup_sglang_launch.py"
stop_leftover_servers() {
  for pid in $(pgrep -f "$launcher" || true); do
    echo "test.sh: stopping leftover SGLang server process group $pid" >&2
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
}
trap stop_leftover_servers EXIT
. .venv/bin/activate
python -m pytest -q "$@"
