#!/usr/bin/env bash
# Set up and run the test suite: the default tier on two pytest-xdist workers; `--all` (CI) runs it and then
# the slow tier in one process; other arguments go to pytest (-m slow, a test's path, ...).
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
# Two workers (SOUP_TEST_WORKERS to change; 0: one process): in one process the default tier leaves a core idle
# about half the time (server start-ups, process launches, waits). Tests sharing one fixed cost (a module's
# servers, the Slurm node) are one xdist group, run by one worker. The slow tier's workers run every process
# with one thread (OMP_NUM_THREADS=1, inherited by the trainers, torchrun ranks and SGLang servers its tests
# start): with torch's two threads per process its compute-bound items slowed each other up to 5x (the demo
# model's SFT: 134 s alone, 702 s beside another worker's tests); with one each, two workers ran the slow tier
# in 30 min 24 s against 48 min 13 s in one process (2026-12-04, this 2-core machine). Three slow-tier workers
# (tried 2026-12-07) left no core idle but were no faster (23 of 45 tests done after 22 min, two workers about
# 25), and the demo model's SFT, pinned to 2 threads (SFT_THREADS), ran past pytest's 900 s limit beside them.
# Both tiers in one session of two one-thread workers (tried 2026-12-07, so the slow tier's waits could take the
# default tier's work) were no faster either: 385 passed in 57 min 41 s against 12 min 29 s + 46 min 3 s apart.
# OpenMP threads that wait passively: a process with two threads (torch's default here; the demo model's SFT)
# beside another busy one spun its waiting thread on the core the other needed: 100 SFT steps took 104 s beside a
# busy process, 57 s with PASSIVE, 32 s alone (2026-12-07). The wait policy changes no result (the same weights).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
workers=${SOUP_TEST_WORKERS:-2}
if [ "${1:-}" = --all ]; then
  shift
  status=0
  python -m pytest -q -n "$workers" --dist loadgroup -m "not slow and not gpu" "$@" || status=$?
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m pytest -q -n "$workers" --dist loadgroup -m slow "$@" || status=$?
  exit "$status"
fi
python -m pytest -q -n "$workers" --dist loadgroup "$@"
