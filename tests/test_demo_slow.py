"""The README demo, end to end (slow tier): the tiny model is built, SOUP trains it, held-out
sampled pass@1 clearly improves over the SFT start."""

import subprocess
import sys

import pytest

from soup_megatron.metrics import read_metrics


@pytest.mark.slow
def test_demo_learns(tmp_path):
    common = ["--config", "configs/tiny_cpu.yaml", f"model.path={tmp_path}/model", f"trainer.out_dir={tmp_path}/run",
              "trainer.progress=false"]
    for command in ("prepare", "train"):
        proc = subprocess.run([sys.executable, "-m", "soup_megatron.cli", command, *common],
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = rows[0], rows[-1]
    assert last["step"] == 80
    assert 0.05 <= first["heldout/pass1"] <= 0.5, "the SFT start should be weak but not hopeless"
    assert last["heldout/pass1"] >= first["heldout/pass1"] + 0.15, (first, last)
    assert last["heldout/greedy_acc"] >= first["heldout/greedy_acc"] - 0.05
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert any((tmp_path / "run" / "tensorboard").iterdir())
