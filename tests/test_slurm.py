"""`soup-megatron launch` against a real single-node Slurm cluster (tools/slurm_cluster.sh; tools/test.sh
starts one and exports SLURM_CONF). Jobs run the tiny SOUP demo with two gloo ranks under srun + torchrun."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from soup_megatron.model.hf import read_state_dict
from tests.conftest import TINY
from tests.helpers import wait_until
from tests.slurm_jobs import job_id, log_of, metrics, squeue_state, state, wait_done

ROOT = Path(__file__).resolve().parents[1]
# the cluster has one node of 2 CPUs and each job takes both: one pytest-xdist worker submits them all, in turn
pytestmark = pytest.mark.xdist_group("slurm-node")

if not os.environ.get("SLURM_CONF"):
    if os.environ.get("SOUP_REQUIRE_SLURM") == "1":
        raise RuntimeError("SOUP_REQUIRE_SLURM=1 but SLURM_CONF is not set: tools/slurm_cluster.sh did not start")
    pytest.skip("no Slurm cluster here (bash tools/slurm_cluster.sh start DIR, then export SLURM_CONF)",
                allow_module_level=True)


def launch(*overrides, dryrun=False, check=True):
    cmd = [sys.executable, "-m", "soup_megatron.cli", "launch", "--config", "configs/tiny_cpu.yaml", "--executor",
           "slurm", *(["--dryrun"] if dryrun else []), *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"launch failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    return done


def tiny_run(model, out, *extra):
    """Two gloo ranks (megatron actor, TP=2) on the one node, 2 CPUs."""
    return [*TINY, f"model.path={model}", "model.tiny.num_kv_heads=2", f"trainer.out_dir={out}",
            "actor.backend=megatron", "actor.megatron.tensor_parallel=2", "launch.ranks_per_node=2",
            "launch.slurm.cpus_per_task=2", f"launch.python={sys.executable}", "launch.slurm.time=00:20:00",
            "launch.slurm.signal_seconds=0", *extra]


def node_state() -> str:
    """The one node's state: idle once no job holds it (a job that ended is torn down while "comp")."""
    return subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip()


@pytest.mark.slow  # 82 s: in the slow tier to keep the default under 15 min
def test_submitted_run_converts_trains_and_a_missing_checkpoint_dir_fails_clearly(tiny_model_kv2, tmp_path):
    out = tmp_path / "run"
    submitted = launch(*tiny_run(tiny_model_kv2, out, "trainer.steps=2", "trainer.eval_interval=0",
                                 "launch.convert_from_hf=true"))
    convert, train = [line.split("job ")[1].split()[0] for line in submitted.stdout.splitlines()]
    assert wait_done(train) == "COMPLETED", log_of(out)
    assert state(convert) == "COMPLETED"  # the training job waited for it (afterok)
    assert (out / "megatron_init" / "soup_megatron.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (out / "checkpoints" / "step_000002" / "actor" / "soup_megatron.json").is_file()
    # a requeued job whose checkpoints vanished must not start over from step 0
    out2 = tmp_path / "vanished"
    job = job_id(launch(*tiny_run(tiny_model_kv2, out2, "trainer.steps=50", "trainer.eval_interval=0",
                                  "trainer.save_interval=1")))
    while not (out2 / "checkpoints" / "latest").is_file():
        assert squeue_state(job) in ("PENDING", "RUNNING"), log_of(out2)
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job], check=True)  # preempted: back to the queue
    while squeue_state(job) != "PENDING":
        time.sleep(0.5)
    shutil.rmtree(out2 / "checkpoints")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    assert wait_done(job) == "FAILED"
    assert "restart 1 of Slurm job" in log_of(out2) and "the run's checkpoints vanished" in log_of(out2)
    assert not (out2 / "checkpoints").exists()


def test_unknown_partition_is_refused_with_the_partitions_there_are(tmp_path):
    done = launch(f"trainer.out_dir={tmp_path / 'run'}", "launch.slurm.partition=gpu-h100", check=False)
    assert done.returncode == 2
    assert "invalid partition" in done.stderr.lower() and "partitions on this cluster: debug" in done.stderr


@pytest.mark.slow  # moved from the default tier to keep it under 15 min on 2 cores
def test_sglang_servers_run_as_serve_tasks_that_the_trainer_finds(tiny_model, tmp_path):
    """rollout.sglang.servers_from=serve: the job starts one `soup-megatron serve` task per SGLang server
    (here beside the trainer: one node); the trainer starts none, finds theirs through the run directory,
    trains on them; when it ends the job stops them and their records go."""
    out = tmp_path / "run"
    job = job_id(launch(*TINY, f"model.path={tiny_model}", f"trainer.out_dir={out}", "rollout.backend=sglang",
                        f"rollout.sglang.python={ROOT / '.venv-sglang' / 'bin' / 'python'}",
                        "rollout.sglang.max_total_tokens=4096", "rollout.sglang.servers_from=serve",
                        "trainer.steps=2", "trainer.eval_interval=0", "history.interval=1",
                        f"launch.python={sys.executable}", "launch.slurm.cpus_per_task=2",
                        "launch.slurm.time=00:20:00", "launch.slurm.signal_seconds=0"))
    assert wait_done(job) == "COMPLETED", log_of(out)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["mix/mixed_samples"] > 0 and r["logp_gap/max"] < 1e-3 for r in rows[1:]), rows
    log = log_of(out)
    for group in ("policy", "history"):
        info = json.loads((out / "servers" / f"{group}.json").read_text())
        assert info["pids"] == [] and info["supervised"] == info["urls"]  # the trainer started none
        assert len(info["urls"]) == 1 and f"{group} server 0 ready at {info['urls'][0]}" in log
    assert not list((out / "servers").glob("*.serve.json"))  # the serve tasks ended and removed their records
    steps = subprocess.run(["sacct", "-n", "-P", "-j", job, "-o", "JobName,State"], capture_output=True,
                           text=True).stdout
    assert steps.count("python") >= 3 and "RUNNING" not in steps, steps  # two serve steps and the trainer


@pytest.mark.slow
def test_preempted_run_resumes_to_the_same_final_state(tiny_model_kv2, tmp_path):
    """USR1 (Slurm's time-limit warning) mid-run: checkpoint at the end of the step, requeue, resume;
    the final weights and metrics equal an uninterrupted run's."""
    common = ["trainer.steps=8", "trainer.save_interval=3", "trainer.eval_interval=4", "soup.lookahead=2",
              "history.interval=2", "launch.slurm.signal_seconds=60"]
    straight = job_id(launch(*tiny_run(tiny_model_kv2, tmp_path / "straight", *common)))
    assert wait_done(straight) == "COMPLETED", log_of(tmp_path / "straight")
    out = tmp_path / "preempted"
    job = job_id(launch(*tiny_run(tiny_model_kv2, out, *common)))
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.is_file() and latest.read_text().strip() >= "step_000003") and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    # the job script requeues itself; a requeued job waits for its BeginTime: once it is back in the queue and
    # the node has finished the first start, start it again. Not within the second of the requeue: slurmd
    # refuses a job whose credential is no newer than the revocation, in whole seconds ("Job credential
    # revoked"; a CI run restarted it 0.4 s after the requeue and it failed at once)
    def requeued() -> bool:  # back in the queue with the node free (or already started again by Slurm)
        log = log_of(out)
        return "requeueing job" in log and ((squeue_state(job) == "PENDING" and node_state() == "idle")
                                            or "restart 1" in log)

    assert wait_until(requeued, timeout=300), (log_of(out), squeue_state(job), node_state())
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    assert wait_done(job) == "COMPLETED", log_of(out)
    log = log_of(out)
    assert "USR1: checkpoint and stop" in log and "restart 1" in log
    assert metrics(out) == metrics(tmp_path / "straight") and metrics(out)[-1]["step"] == 8
    a = read_state_dict(tmp_path / "straight" / "history" / "v000008")  # the final policy, exported to HF
    b = read_state_dict(out / "history" / "v000008")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = "history/manifest.json"
    assert (tmp_path / "straight" / manifest).read_text() == (out / manifest).read_text()


@pytest.mark.slow
def test_demo_learns_under_sbatch_and_runs_under_nemo_run(demo_model, tmp_path):
    """The README demo model with the megatron actor on two gloo ranks (TP=2): 16 SOUP steps submitted with
    `soup-megatron launch --executor slurm` must raise held-out sampled pass@1 (a 6-step run gained 0.07
    here); the same job submitted with nemo-run's SlurmExecutor runs 4 steps to success (the same training
    path: what differs is the submission)."""
    from .test_nemo_run import experiment

    run = ["trainer.progress=false", "actor.backend=megatron", "actor.megatron.tensor_parallel=2",
           f"model.path={demo_model}"]
    job = job_id(launch(*run, "trainer.steps=16", "trainer.eval_interval=16", f"trainer.out_dir={tmp_path / 'sbatch'}",
                        "launch.ranks_per_node=2", "launch.slurm.cpus_per_task=2", f"launch.python={sys.executable}"))
    assert wait_done(job) == "COMPLETED", log_of(tmp_path / "sbatch")
    rows = metrics(tmp_path / "sbatch")
    assert rows[-1]["step"] == 16
    assert rows[-1]["heldout/pass1"] >= rows[0]["heldout/pass1"] + 0.05, (rows[0], rows[-1])
    done = experiment("--executor", "slurm", "--config", "configs/tiny_cpu.yaml", *run, "launch.slurm.account=soup",
                      "launch.ranks_per_node=2", "launch.slurm.cpus_per_task=2", f"launch.python={sys.executable}",
                      "trainer.steps=4", "trainer.eval_interval=0", f"trainer.out_dir={tmp_path / 'nemo'}")
    assert done.returncode == 0 and "train SUCCEEDED" in done.stdout, done.stdout[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "nemo") if "loss" in r] == [1, 2, 3, 4]
