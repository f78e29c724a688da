"""launch/soup_experiment.py: nemo-run (its own venv, .venv-launch) drives the trainer; failures are
reported as failures (nemo-run itself returns normally when a job fails)."""

import subprocess
import sys

import pytest

from .conftest import ROOT, TINY

LAUNCH_PYTHON = ROOT / ".venv-launch" / "bin" / "python"


def experiment(*args, timeout=900, env=None):
    """launch/soup_experiment.py with these arguments; `env`: another cluster's (its SLURM_CONF)."""
    if not LAUNCH_PYTHON.is_file():
        pytest.fail(f"{LAUNCH_PYTHON} is missing: run `bash tools/setup_launch.sh` (tools/test.sh does)")
    # experiments are recorded under nemo-run's home (~/.nemo_run); with NEMORUN_HOME set, nemo-run 0.11's
    # LocalTunnel(job_dir="") writes Slurm logs under a doubled path that does not exist
    return subprocess.run([str(LAUNCH_PYTHON), "launch/soup_experiment.py", "--trainer-python", sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow  # moved from the default tier to keep it under 15 min on 2 cores
def test_local_executor_runs_and_a_failed_job_is_a_failure(tiny_model, tmp_path):
    ok = experiment("--executor", "local", "--config", "configs/tiny_cpu.yaml", *TINY, f"model.path={tiny_model}",
                    f"trainer.out_dir={tmp_path / 'run'}", "trainer.steps=1", "trainer.eval_interval=0")
    assert ok.returncode == 0 and "train SUCCEEDED" in ok.stdout, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step_000001").is_dir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # validates as a path; the job fails when it loads the model
    failed = experiment("--executor", "local", "--config", "configs/tiny_cpu.yaml", *TINY, f"model.path={broken}",
                        f"trainer.out_dir={tmp_path / 'failed'}", "trainer.steps=1")
    assert failed.returncode == 1 and "train FAILED" in failed.stdout, failed.stdout[-2000:]
    bad = experiment("--executor", "local", "--config", "configs/tiny_cpu.yaml", "trainer.stepz=1")
    assert bad.returncode != 0 and "unknown key 'trainer.stepz'" in bad.stderr
    # Slurm jobs nemo-run cannot submit: refused in one line before anything is written or queued
    no_account = experiment("--executor", "slurm", "--config", "configs/tiny_3node_cpu.yaml",
                            f"trainer.out_dir={tmp_path / 'a'}")
    assert no_account.returncode != 0 and not (tmp_path / "a").exists()
    assert no_account.stderr.strip().endswith("launch.slurm.account is empty: nemo-run's SlurmExecutor needs an "
                                              "account")
    beside = experiment("--executor", "slurm", "--config", "configs/tiny_cpu.yaml", "launch.slurm.account=soup",
                        "rollout.backend=sglang", "rollout.sglang.servers_from=serve",
                        f"trainer.out_dir={tmp_path / 'b'}")
    assert beside.returncode != 0 and not (tmp_path / "b").exists()
    assert "launch.slurm.rollout_nodes=0 puts the serve tasks beside the trainer" in beside.stderr
