"""The README demo, end to end (slow tier): the tiny model is built, SOUP trains it, held-out
sampled pass@1 clearly improves over the SFT start; the same with SGLang serving the rollouts."""

import subprocess
import sys

import pytest

from soup_megatron.metrics import read_metrics

from .test_sglang import SGLANG_PYTHON


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "soup_megatron.cli", *args], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_demo_learns(demo_model, tmp_path):
    """The README demo's first 40 of its 80 steps (the README's pass@1 at step 40 is 0.647 from 0.381: the
    bound below leaves room; half the steps halve the slow tier's longest test). Held-out evaluation at the
    start and the end only: the assertions read those two, and evaluation draws its own random stream, so
    the trained policy is the demo's."""
    run_cli("train", "--config", "configs/tiny_cpu.yaml", f"model.path={demo_model}", f"trainer.out_dir={tmp_path}/run",
            "trainer.progress=false", "trainer.steps=40", "trainer.eval_interval=0")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = rows[0], rows[-1]
    assert last["step"] == 40
    assert 0.05 <= first["heldout/pass1"] <= 0.5, "the SFT start should be weak but not hopeless"
    assert last["heldout/pass1"] >= first["heldout/pass1"] + 0.15, (first, last)
    assert last["heldout/greedy_acc"] >= first["heldout/greedy_acc"] - 0.05
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert any((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_learns_with_sglang_rollouts(demo_model, tmp_path):
    """30 SOUP steps with the on-policy and historical SGLang servers. Held-out evaluation at the start and the
    end only. 20 steps were too few for the bound: the README demo gains 0.11 by step 20 and 0.18 by step 30,
    and SGLang runs do not repeat exactly: CI runs at 20 steps gained 0.18 once and 0.096 once (its training
    reward had risen from 0.38 to 0.58)."""
    run_cli("train", "--config", "configs/tiny_cpu.yaml", f"model.path={demo_model}", f"trainer.out_dir={tmp_path}/run",
            "trainer.progress=false", "trainer.steps=30", "trainer.eval_interval=30", "rollout.backend=sglang",
            f"rollout.sglang.python={SGLANG_PYTHON}")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = rows[0], rows[-1]
    assert last["step"] == 30
    assert last["heldout/pass1"] >= first["heldout/pass1"] + 0.1, (first, last)
    assert max(r.get("logp_gap/max", 0.0) for r in rows) < 1e-3
    assert not (tmp_path / "run" / "servers" / "sgl_kernel_calls.log").exists()
