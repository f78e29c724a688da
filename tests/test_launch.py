"""`soup-megatron launch` without a cluster: dry runs, the committed recipe scripts, the local executor."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from soup_megatron.cli import main
from soup_megatron.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "slurm").glob("*.sbatch"))


def dryrun(config: str, *overrides: str) -> str:
    done = subprocess.run([sys.executable, "-m", "soup_megatron.cli", "launch", "--config", config,
                           "--executor", "slurm", "--dryrun", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("recipe", RECIPES)
def test_committed_sbatch_scripts_are_the_recipes_dry_runs(recipe):
    """slurm/<recipe>.sbatch must be what `launch --dryrun` renders from configs/<recipe>.yaml today
    (refresh: soup-megatron launch --config configs/R.yaml --executor slurm --dryrun > slurm/R.sbatch)."""
    assert dryrun(f"configs/{recipe}.yaml") == (ROOT / "slurm" / f"{recipe}.sbatch").read_text()


def test_recipes_exist_for_the_demo_the_7b_node_and_70b_on_16_nodes():
    assert {"tiny_cpu", "qwen2.5_math_7b_8xh100", "llama3_70b_16x8xh100"} <= set(RECIPES)
    script = (ROOT / "slurm" / "qwen2.5_math_7b_8xh100.sbatch").read_text()
    assert "--nproc-per-node=4" in script and "--gpus-per-node=8" in script and "--signal=B:USR1@300" in script
    assert "hf-to-megatron" in script  # the conversion job, submitted first with afterok


def test_70b_recipe_trains_on_8_nodes_and_serves_from_the_other_8():
    script = (ROOT / "slurm" / "llama3_70b_16x8xh100.sbatch").read_text()
    assert "#SBATCH --nodes=16" in script and "--nnodes=8 --nproc-per-node=8" in script
    # eight policy servers on nodes 8-15, a colocated history server beside each (same nodes, same GPUs)
    assert script.count("srun --nodes=8 --relative=8 --ntasks=8 --ntasks-per-node=1 --cpus-per-task=48") == 2
    assert "--group policy" in script and "--group history" in script
    assert 'kill -USR1 "${servers[@]}"' in script  # servers stop once training has ended
    cfg = load_config("configs/llama3_70b_16x8xh100.yaml")
    mc = cfg.actor.megatron
    assert (mc.tensor_parallel, mc.pipeline_parallel) == (8, 4)
    assert 8 * cfg.launch.ranks_per_node // (mc.tensor_parallel * mc.pipeline_parallel) == 2  # data parallel


def job_shape(script: str) -> list[str]:
    """The training job's steps with its sizes, counts, paths and GPU options taken out: the sbatch lines that
    shape it, each srun, the torchrun under it and the exports."""
    script = script[script.index("#!/bin/bash", 1):] if "-convert" in script.splitlines()[1] else script
    lines = [line.strip().rstrip("\\").strip() for line in script.splitlines()]
    kept = [line for line in lines if line.startswith(("srun", "export", "-m", "--rdzv", "#SBATCH --nodes",
                                                       "#SBATCH --ntasks", "#SBATCH --signal", "#SBATCH --requeue"))
            or " -m soup_megatron" in line or "torch.distributed.run" in line]
    normalized = []
    for line in kept:
        line = re.sub(r" --gpus-per-node=\d+", "", line)  # GPUs: a size, absent on CPU nodes
        line = re.sub(r"\S*/launch/config\.yaml", "CONFIG", line)
        line = re.sub(r"\S*python\b", "PYTHON", line)
        line = re.sub(r"(IFNAME=)\w+", r"\1IFACE", line)
        normalized.append(re.sub(r"\d+", "N", line))
    return normalized


def test_the_3_node_cpu_recipe_is_the_70b_recipe_in_sizes_and_counts_only():
    """configs/tiny_3node_cpu.yaml (2 training nodes + 1 rollout node) renders through the same template and
    code path as the 70B recipe (8 + 8): the same steps, in the same order, with other numbers; the 7B recipe
    (one node, servers started by the trainer) runs the same training step."""
    tiny, big = dryrun("configs/tiny_3node_cpu.yaml"), dryrun("configs/llama3_70b_16x8xh100.yaml")
    assert job_shape(tiny) == job_shape(big)
    assert sum(line.startswith("srun") for line in job_shape(tiny)) == 3  # policy serve, history serve, torchrun
    seven = job_shape(dryrun("configs/qwen2.5_math_7b_8xh100.yaml"))
    single_node = [line for line in job_shape(big) if not ("serve" in line or "--overlap" in line or "IFNAME" in line)]
    assert single_node == seven
    cfg = load_config("configs/tiny_3node_cpu.yaml")
    assert (cfg.launch.slurm.nodes, cfg.launch.slurm.rollout_nodes, cfg.launch.ranks_per_node) == (3, 1, 1)
    assert cfg.actor.megatron.pipeline_parallel == 2  # one stage per training node
    assert "--nnodes=2 --nproc-per-node=1" in tiny and "export NCCL_SOCKET_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0" in tiny


def test_training_nodes_that_do_not_make_whole_replicas_are_refused():
    done = subprocess.run([sys.executable, "-m", "soup_megatron.cli", "launch", "--config",
                           "configs/tiny_3node_cpu.yaml", "--executor", "slurm", "--dryrun",
                           "actor.megatron.pipeline_parallel=4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and not done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        "config error: launch.slurm.nodes=3 less rollout_nodes=1, x launch.ranks_per_node=1: 2 training ranks, not "
        "a multiple of actor.megatron tensor_parallel x pipeline_parallel x context_parallel = 1 x 4 x 1 = 4")


def test_serve_tasks_are_split_over_the_rollout_nodes_or_refused(tmp_path):
    from soup_megatron.cluster.launch import serve_steps

    base = ["rollout.backend=sglang", "rollout.sglang.servers_from=serve", "launch.slurm.nodes=4",
            "launch.slurm.rollout_nodes=2", "launch.slurm.cpus_per_task=8"]
    steps = serve_steps(load_config("configs/tiny_cpu.yaml", base + ["rollout.sglang.policy_servers=2",
                                                                      "rollout.sglang.history_servers=2"]))
    assert [(s.group, s.nodes, s.relative, s.tasks, s.per_node, s.cpus) for s in steps] == [
        ("policy", 1, 2, 2, 2, 4), ("history", 1, 3, 2, 2, 4)]
    colocated = serve_steps(load_config("configs/tiny_cpu.yaml", base + [
        "rollout.sglang.policy_servers=2", "rollout.sglang.history_servers=2", "soup.history_placement=colocated"]))
    assert [(s.group, s.nodes, s.relative, s.tasks, s.per_node, s.cpus) for s in colocated] == [
        ("policy", 2, 2, 2, 1, 4), ("history", 2, 2, 2, 1, 4)]  # history server i beside policy server i
    with pytest.raises(ConfigError, match=r"same number of servers \(4 / 3 = 1.33\)"):
        serve_steps(load_config("configs/tiny_cpu.yaml", [*base, "launch.slurm.rollout_nodes=3",
                                                          "rollout.sglang.policy_servers=3"]))
    with pytest.raises(ConfigError, match="launch.slurm.rollout_nodes=1 is not allowed; expected 0 unless "
                                          "rollout.sglang.servers_from=serve"):
        load_config("configs/tiny_cpu.yaml", ["launch.slurm.nodes=2", "launch.slurm.rollout_nodes=1"])
    with pytest.raises(ConfigError, match="rollout_nodes=4 is not allowed; expected >= 0 and < launch.slurm.nodes"):
        load_config("configs/tiny_cpu.yaml", [*base, "launch.slurm.rollout_nodes=4"])
    with pytest.raises(ConfigError, match="rollout_nodes=0 is not allowed; expected > 0 with "
                                          "rollout.sglang.servers_from=serve on launch.slurm.nodes=4"):
        load_config("configs/tiny_cpu.yaml", [*base, "launch.slurm.rollout_nodes=0"])
    load_config("configs/tiny_cpu.yaml", [*base, "launch.slurm.nodes=1", "launch.slurm.rollout_nodes=0"])
    # with the in-process engine no serve task runs: the servers' placement does not matter
    load_config("configs/tiny_cpu.yaml", [*base, "launch.slurm.rollout_nodes=0", "rollout.backend=local"])
    assert main(["launch", "--config", "configs/tiny_cpu.yaml", "--executor", "local", "--dryrun",
                 f"trainer.out_dir={tmp_path / 'run'}", "rollout.backend=sglang",
                 "rollout.sglang.servers_from=serve"]) == 2  # the local executor starts no serve tasks


def test_dryrun_prints_the_scripts_and_writes_nothing(tmp_path):
    out = dryrun("configs/tiny_cpu.yaml", f"trainer.out_dir={tmp_path / 'run'}", "actor.backend=megatron",
                 "launch.convert_from_hf=true", "launch.slurm.network_interface=ib0",
                 "launch.slurm.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                 "launch.slurm.container_mounts=[/shared]")
    assert out.count("#!/bin/bash") == 2 and "--signal=B:USR1@120" in out
    assert "export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0" in out
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/shared" in out
    assert "hf-to-megatron" in out and not (tmp_path / "run").exists()


def test_layout_gives_the_sbatch_jobs_commands_and_freezes_the_config_unless_a_dry_run(tmp_path):
    """`launch --layout` (launch/soup_experiment.py's view of the job): the nodes, tasks and the very commands
    the sbatch scripts run; the config frozen in the run directory, or nothing written with --dryrun."""
    out = tmp_path / "run"
    # a partition no cluster here has: the node count is not checked against the tests' one-node cluster
    args = [sys.executable, "-m", "soup_megatron.cli", "launch", "--config", "configs/tiny_3node_cpu.yaml",
            "--executor", "slurm", "--layout", f"trainer.out_dir={out}", "launch.slurm.partition=elsewhere"]
    described = subprocess.run([*args, "--dryrun"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert described.returncode == 0, described.stderr
    assert not out.exists()
    layout = json.loads(described.stdout)
    scripts = dryrun("configs/tiny_3node_cpu.yaml", f"trainer.out_dir={out}", "launch.slurm.partition=elsewhere")
    assert layout["train_command"] in scripts and layout["convert_command"] in scripts
    assert layout["interface_setup"] in scripts
    assert [(s["group"], s["relative"], s["nodes"], s["per_node"]) for s in layout["serve_steps"]] == [
        ("policy", 2, 1, 1), ("history", 2, 1, 1)]
    assert all(s["command"] in scripts for s in layout["serve_steps"])
    assert (layout["train_nodes"], layout["ranks_per_node"], layout["slurm"]["nodes"]) == (2, 1, 3)
    frozen = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert frozen.returncode == 0 and json.loads(frozen.stdout) == layout, frozen.stderr
    assert load_config(str(out / "launch" / "config.yaml")).launch.slurm.nodes == 3
    assert not list((out / "launch").glob("*.sbatch"))  # nothing submitted
    local = subprocess.run([*args[:7], "local", "--layout"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert local.returncode == 2 and local.stderr.strip().endswith("--layout describes a Slurm job: use it with "
                                                                   "--executor slurm")


def test_launch_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="launch.slurm.time='4h' is not allowed; expected a Slurm time limit"):
        load_config("configs/tiny_cpu.yaml", ["launch.slurm.time=4h"])
    assert main(["launch", "--config", "configs/tiny_cpu.yaml", "--executor", "slurm", "--dryrun",
                 "launch.convert_from_hf=true"]) == 2  # conversion needs the megatron actor


def test_local_executor_runs_the_frozen_config(tiny_model, tmp_path):
    from tests.conftest import TINY

    out = tmp_path / "run"
    assert main(["launch", "--config", "configs/tiny_cpu.yaml", "--executor", "local", *TINY,
                 f"model.path={tiny_model}", f"trainer.out_dir={out}", "trainer.steps=1",
                 "trainer.eval_interval=0"]) == 0
    frozen = load_config(str(out / "launch" / "config.yaml"))
    assert frozen.trainer.steps == 1 and frozen.model.path == str(tiny_model)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
