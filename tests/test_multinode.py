"""Multi-node for real (slow tier): a Slurm cluster of three nodes on this machine (tools/slurm_cluster.sh
--nodes 3 --netns: each node its own hostname and network namespace, addresses only on a private bridge), and
configs/tiny_3node_cpu.yaml, the 70B recipe's layout at 3 nodes, submitted with `soup-megatron launch` and with
nemo-run; preempted, a server killed, a training rank killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from soup_megatron.model.hf import read_state_dict
from soup_megatron.rollout.sglang_servers import free_port
from tests.conftest import TINY
from tests.helpers import wait_until
from tests.slurm_jobs import job_id, log_of, metrics, squeue_state, state, wait_done
from tests.test_nemo_run import experiment
from tests.test_sglang import SGLANG_PYTHON

ROOT = Path(__file__).resolve().parents[1]
# one cluster for the module, on one pytest-xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("three-node-cluster")]


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """The environment of a three-node cluster's clients (its SLURM_CONF), on ports of its own so that it runs
    beside the tests' one-node cluster; stopped, its namespaces removed, however the tests ended."""
    if os.geteuid() != 0:
        pytest.fail("the three-node cluster makes network namespaces: run as root (CI does)")
    where = tmp_path_factory.mktemp("slurm-3-nodes")
    ports = {name: str(free_port("127.0.0.1")) for name in ("SLURMCTLD_PORT", "SLURMD_PORT", "SLURMDBD_PORT",
                                                             "MYSQL_PORT")}
    env = {**os.environ, **ports}
    started = subprocess.run(["bash", "tools/slurm_cluster.sh", "start", str(where), "--nodes", "3", "--netns"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        conf = started.stdout.strip().removeprefix("export SLURM_CONF=")
        yield {**env, "SLURM_CONF": conf}
    finally:
        subprocess.run(["bash", "tools/slurm_cluster.sh", "stop", str(where)], cwd=ROOT, env=env, timeout=300)


def recipe(model: Path, out: Path, *overrides: str) -> list[str]:
    """configs/tiny_3node_cpu.yaml's overrides for the test model and this machine's interpreters."""
    return [*TINY, f"model.path={model}", f"trainer.out_dir={out}", "trainer.eval_interval=0",
            f"launch.python={sys.executable}", f"rollout.sglang.python={SGLANG_PYTHON}", "rollout.max_response_len=16",
            "launch.slurm.signal_seconds=0", f"launch.rendezvous_port={free_port('127.0.0.1')}", *overrides]


def launch(cluster: dict, model: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`soup-megatron launch --executor slurm` of configs/tiny_3node_cpu.yaml with the test model, on `cluster`."""
    return subprocess.run(
        [sys.executable, "-m", "soup_megatron.cli", "launch", "--config", "configs/tiny_3node_cpu.yaml",
         "--executor", "slurm", *recipe(model, out, *overrides)],
        cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=120)


def preempt(cluster: dict, job: str, out: Path, after: str) -> None:
    """USR1 once checkpoint `after` is written: the job checkpoints, requeues itself and is started again."""
    latest = out / "checkpoints" / "latest"
    assert wait_until(lambda: latest.is_file() and latest.read_text().strip() >= after, timeout=600), log_of(out)
    restarts = log_of(out).count("USR1: checkpoint and stop")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)

    def requeued() -> bool:  # back in the queue with every node free (or already started again by Slurm)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], env=cluster, capture_output=True, text=True).stdout
        log = log_of(out)
        return log.count("requeueing job") > restarts and (
            (squeue_state(job, cluster) == "PENDING" and nodes.split() == ["idle"])
            or f"restart {restarts + 1}" in log)

    assert wait_until(requeued, timeout=300), (log_of(out), squeue_state(job, cluster))
    time.sleep(2)  # slurmd refuses a credential no newer than the requeue's revocation, in whole seconds
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, capture_output=True)


def processes_of(out: Path) -> dict[int, dict[bytes, bytes]]:
    """The processes whose command line names the run directory, with their environments."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out).encode() in (proc / "cmdline").read_bytes():
                found[int(proc.name)] = dict(entry.split(b"=", 1) for entry in
                                             (proc / "environ").read_bytes().split(b"\0") if b"=" in entry)
        except OSError:  # it ended meanwhile
            pass
    return found


def training_rank_on(node: str, out: Path) -> int:
    """The pid of the training rank (a torchrun worker, not its agent) running on `node`."""
    ranks = [pid for pid, env in processes_of(out).items()
             if env.get(b"SLURMD_NODENAME") == node.encode() and b"LOCAL_RANK" in env]
    assert len(ranks) == 1, ranks
    return ranks[0]


def trained_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def placements(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "placement.jsonl").read_text().splitlines()]


def test_the_cluster_has_three_named_nodes_and_a_rendezvous_across_two(three_nodes, tmp_path):
    """Each node answers with its own name and address, `MASTER_ADDR` (the first node) resolves to n1's
    address on every node, and a torchrun rendezvous across n1 and n2 all-reduces over gloo."""
    probe = tmp_path / "probe.py"
    probe.write_text("import socket, torch, torch.distributed as d\nd.init_process_group('gloo')\n"
                     "t = torch.tensor([d.get_rank() + 1.0]); d.all_reduce(t)\n"
                     "print(socket.gethostname(), d.get_rank(), t.item(), flush=True)\n")
    names = subprocess.run(["srun", "-N3", "bash", "-c", "echo $(hostname) $SLURM_NODEID $(getent hosts n1)"],
                           env=three_nodes, capture_output=True, text=True, timeout=120)
    assert sorted(names.stdout.split("\n")[:3]) == [f"n{i} {i - 1} 10.217.0.1 n1" for i in (1, 2, 3)], names
    script = (f"export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1); "
              f"{sys.executable} -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d "
              f"--rdzv-endpoint $MASTER_ADDR:{free_port('127.0.0.1')} {probe}")
    ran = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c", script], env=three_nodes,
                         capture_output=True, text=True, timeout=300)
    assert sorted(ran.stdout.split("\n")[:2]) == ["n1 0 3.0", "n2 1 3.0"], ran


def assert_laid_out_across_the_nodes(placement: dict) -> None:
    """Trainer rank 0 (pipeline stage 0) on n1, rank 1 (stage 1) on n2, both server groups on n3."""
    assert [(p["host"], p["pp_rank"]) for p in placement["trainer"]] == [("n1", 0), ("n2", 1)]
    assert sorted(placement["servers"]) == ["history", "policy"]
    assert all(url.startswith("http://n3:") for urls in placement["servers"].values() for url in urls)


def test_the_3_node_recipe_trains_across_nodes_and_resumes_after_preemption(three_nodes, tiny_model, tmp_path):
    """`soup-megatron launch --executor slurm` of configs/tiny_3node_cpu.yaml: the conversion job, then the
    training job, whose two torchrun ranks (one pipeline stage each) run on n1 and n2 and whose policy and
    history servers are `serve` tasks on n3, reached by that name; every step's weights reach them. The
    policy server killed on n3 mid-rollout: its serve task starts it again, the trainer waits for it and
    loads the current weights into it before it serves again (the log-prob gap stays at zero). USR1 mid-run
    (Slurm's time-limit warning): the trainer checkpoints at the end of its step, the job requeues itself,
    and the next start resumes on the same layout: every step is trained once, none lost or repeated.
    (One run for all three: a run of its own for the layout took 76 s in CI.)"""
    out = tmp_path / "run"
    submitted = launch(three_nodes, tiny_model, out, "trainer.steps=6", "trainer.save_interval=2")
    assert submitted.returncode == 0, submitted.stderr
    job = job_id(submitted, "train")
    # the policy server's process group killed on n3 while step 2 runs: its serve task restarts it
    assert wait_until(lambda: (out / "metrics.jsonl").is_file() and trained_steps(out), timeout=600), log_of(out)
    serve_task = json.loads((out / "servers" / "policy-0.serve.json").read_text())["pid"]
    server = int(Path(f"/proc/{serve_task}/task/{serve_task}/children").read_text().split()[0])
    os.killpg(server, signal.SIGKILL)
    preempt(three_nodes, job, out, after="step_000002")
    assert wait_done(job, env=three_nodes) == "COMPLETED", log_of(out)
    assert state(job_id(submitted, "convert"), three_nodes) == "COMPLETED"
    log = log_of(out)
    assert "policy server 0 exited; restarting it on the same port" in log
    assert "USR1: checkpoint and stop" in log and "restart 1" in log
    assert trained_steps(out) == [1, 2, 3, 4, 5, 6]
    # the engine's log-probs of what it sampled equal the actor's: each step's weights reached n3's servers,
    # the restarted one's included
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["logp_gap/max"] < 1e-3 for r in rows if "logp_gap/max" in r)
    rollout = {r["step"]: r["time/rollout"] for r in rows if "time/rollout" in r}
    print(f"rollout of step 2, during which the server was restarted: {rollout[2]:.1f} s (step 3: {rollout[3]:.1f} s)")
    first, second = placements(out)
    assert first["start_step"] == 0 and second["start_step"] >= 2
    for placement in (first, second):
        assert_laid_out_across_the_nodes(placement)
    steps = subprocess.run(["sacct", "-n", "-P", "-j", job, "-o", "JobName,NodeList,State"], env=three_nodes,
                           capture_output=True, text=True).stdout
    assert "python|n3|" in steps and "python|n[1-2]|COMPLETED" in steps, steps


def test_a_preempted_then_crashed_run_across_nodes_ends_as_an_uninterrupted_one(three_nodes, tiny_model, tmp_path):
    """The in-process engine on the two training nodes (a deterministic layout: no rollout node), megatron PP=2
    across n1 and n2. Preempted after step 2 (USR1, requeue, resume); after step 4 the training rank on n2 is
    killed (kill -9): srun ends n1's rank and the job fails within two minutes, no rank left waiting and the
    checkpoints intact; submitted again (`sbatch <run>/launch/train.sbatch`) it resumes at step 4. Its
    metrics and final weights equal an uninterrupted run's."""
    common = ["rollout.backend=local", "soup.history_placement=dedicated", "launch.slurm.nodes=2",
              "launch.slurm.rollout_nodes=0", "launch.convert_from_hf=false", "trainer.steps=6",
              "trainer.save_interval=2"]
    straight = launch(three_nodes, tiny_model, tmp_path / "straight", *common)
    assert wait_done(job_id(straight), env=three_nodes) == "COMPLETED", log_of(tmp_path / "straight")
    out = tmp_path / "interrupted"
    job = job_id(launch(three_nodes, tiny_model, out, *common))
    preempt(three_nodes, job, out, after="step_000002")
    latest = out / "checkpoints" / "latest"
    assert wait_until(lambda: latest.is_file() and latest.read_text().strip() >= "step_000004", timeout=600), \
        log_of(out)
    os.kill(training_rank_on("n2", out), signal.SIGKILL)
    killed_at = time.time()
    assert wait_done(job, timeout=120, env=three_nodes) == "FAILED", log_of(out)
    ended = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "End"], env=three_nodes, capture_output=True,
                           text=True).stdout.split()[-1]
    print(f"n2's rank killed at {time.strftime('%H:%M:%S', time.localtime(killed_at))}, the job's end recorded as "
          f"{ended}, seen {time.time() - killed_at:.0f} s after the kill")
    assert not processes_of(out), processes_of(out)
    assert trained_steps(out)[-1] < 6, "the run finished before its rank was killed"
    again = subprocess.run(["sbatch", "--parsable", str(out / "launch" / "train.sbatch")], cwd=ROOT,
                           env=three_nodes, capture_output=True, text=True, check=True).stdout.strip()
    assert wait_done(again, env=three_nodes) == "COMPLETED", log_of(out)
    starts = [p["start_step"] for p in placements(out)]  # the preempted start ends after its current step
    assert len(starts) == 3 and starts[0] == 0 and starts[1] >= 2 and starts[2] == 4, starts
    assert metrics(out) == metrics(tmp_path / "straight") and trained_steps(out) == [1, 2, 3, 4, 5, 6]
    a, b = (read_state_dict(run / "history" / "v000006") for run in (tmp_path / "straight", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nemo_run_submits_the_3_node_job(three_nodes, tiny_model, tmp_path):
    """launch/soup_experiment.py --executor slurm with the recipe: the conversion job, then one heterogeneous
    job, the trainer's two nodes and the rollout node, whose tasks run the sbatch job's commands; the
    trainer's end ends the job and no server is left."""
    out = tmp_path / "run"
    done = experiment("--executor", "slurm", "--config", "configs/tiny_3node_cpu.yaml",
                      *recipe(tiny_model, out, "trainer.steps=2", "launch.slurm.account=soup"), env=three_nodes)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "convert SUCCEEDED" in done.stdout and "train SUCCEEDED" in done.stdout, done.stdout[-3000:]
    assert trained_steps(out) == [1, 2]
    (placement,) = placements(out)
    assert_laid_out_across_the_nodes(placement)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["logp_gap/max"] < 1e-3 for r in rows if "logp_gap/max" in r)
    assert wait_until(lambda: not processes_of(out), timeout=60), processes_of(out)


def test_bad_layouts_are_refused_before_anything_is_submitted(three_nodes, tiny_model, tmp_path):
    """More nodes than the partition has: refused in one line, nothing written or submitted. An interface the
    node does not have: the job ends at once, naming it and the node's interfaces (no rank waits on it)."""
    too_many = launch(three_nodes, tiny_model, tmp_path / "five", "launch.convert_from_hf=false",
                      "launch.slurm.nodes=5")  # 4 training ranks: whole PP=2 replicas
    assert too_many.returncode != 0 and not (tmp_path / "five").exists()
    assert too_many.stderr.strip().splitlines()[-1].endswith("launch.slurm.nodes=5: partition debug has 3 node(s)")
    wrong = launch(three_nodes, tiny_model, tmp_path / "ib", "launch.convert_from_hf=false",
                   "launch.slurm.network_interface=ib0")
    assert wrong.returncode == 0, wrong.stderr
    assert wait_done(job_id(wrong, "train"), timeout=120, env=three_nodes) == "FAILED"
    assert "launch.slurm.network_interface=ib0: no such interface on n1 (it has: " in log_of(tmp_path / "ib")
