#!/usr/bin/env bash
# Set up and run the test suite (the default tier; pass -m slow or other pytest arguments to change it).
# Tests start real SGLang servers on CPU from the SGLang venv and a single-node Slurm cluster
# (tools/slurm_cluster.sh); on the way out the cluster is shut down and any server a failed test
# left behind is stopped, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh gguf  # the slow tier prepares the real model (configs/smollm2_135m_cpu.yaml)
bash tools/setup_sglang.sh
bash tools/setup_launch.sh
launcher="$PWD/soup_megatron/rollout/sglang_pythonpath/soup_sglang_launch.py"
stop_leftover_servers() {
  for pid in $(pgrep -f "$launcher" || true); do
    echo "test.sh: stopping leftover SGLang server process group $pid" >&2
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
}
# a real single-node Slurm cluster (slurmctld, slurmd, slurmdbd + MariaDB) for tests/test_slurm.py
slurm_dir=$(mktemp -d /tmp/soup-slurm.XXXXXX)
cleanup() {
  stop_leftover_servers
  bash tools/slurm_cluster.sh stop "$slurm_dir"
}
trap cleanup EXIT
eval "$(bash tools/slurm_cluster.sh start "$slurm_dir")"
export SOUP_REQUIRE_SLURM=1
. .venv/bin/activate
ruff check soup_megatron tests tools launch  # the linter settings are in pyproject.toml
# one process by default; SOUP_TEST_WORKERS=2 runs two pytest-xdist workers (a port race between workers' SGLang servers is open): the tests leave a core idle about
# half the time (server start-ups, process launches, waits), and tests sharing one fixed cost (a module's
# servers, the Slurm node) are one xdist group, run by one worker
python -m pytest -q -n "${SOUP_TEST_WORKERS:-0}" --dist loadgroup "$@"
