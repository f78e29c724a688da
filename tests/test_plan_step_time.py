"""tools/plan_step_time.py: the step-time formulas, the mean-field tokens of a step, the recipe tables."""

import json

import pytest

from soup_megatron.config import load_config
from soup_megatron.planning.step_time import Throughput, Workload, expected_workload, main, step_seconds

QWEN = "configs/architectures/qwen2.5-math-7b.json"
T = Throughput(tau0=0.01, tau1=0.001, prefill_tps=1000.0, train_s_per_unit=0.01, sync_s=5.0, load_s=2.0)


def test_step_time_of_each_placement():
    grpo = Workload(longest=100, decoded=4000, prefilled=1000, trained=2000)
    # rollout 0.01*100 + 0.001*4000/2 + 1000/(1000*2) = 3.5; train 20; sync 5
    assert step_seconds(T, grpo, "colocated", 2, 0, 1) == pytest.approx(28.5)
    soup = Workload(longest=100, decoded=3000, prefilled=1500, trained=2000, history_steps=200, history_versions=2,
                    history_loads=2, history_decoded=1000, history_prefilled=500)
    # dedicated: rollout on 1 server 1 + 3 + 1.5 = 5.5; history on 1: 2 + 1 + 0.5 + 2 * 2 = 7.5 < 30.5: hidden
    assert step_seconds(T, soup, "dedicated", 1, 1, 1) == pytest.approx(30.5)
    assert step_seconds(T, soup, "dedicated", 1, 1, 0) == pytest.approx(38.0)  # no lookahead: on the critical path
    # colocated: rollout on 2: 1 + 1.5 + 0.75 = 3.25; history on 2, the two versions in parallel:
    # 1 + 0.5 + 0.25 + 4 = 5.75 < 25: hidden
    assert step_seconds(T, soup, "colocated", 2, 2, 1) == pytest.approx(28.25)
    slow = Workload(**{**soup.__dict__, "history_loads": 12})  # 25.75 s of history: 0.75 past the window
    assert step_seconds(T, slow, "colocated", 2, 2, 1) == pytest.approx(29.0)
    assert step_seconds(T, soup, "shared", 2, 2, 1) == pytest.approx(3.25 + 5.75 + 25)
    # a call per version covering two steps pays its decode steps once for both: 7.5 - 1 on one server
    assert step_seconds(T, soup, "dedicated", 1, 1, 0, steps_per_call=2) == pytest.approx(37.0)
    serial = Workload(**{**soup.__dict__, "versions_in_parallel": False})
    assert step_seconds(T, serial, "shared", 2, 2, 1) == pytest.approx(3.25 + 6.75 + 25)
    with pytest.raises(ValueError, match="unknown placement 'both'"):
        step_seconds(T, soup, "both", 1, 1, 1)


def test_expected_tokens_of_a_step():
    cfg = load_config("configs/qwen2.5_math_7b_8xh100.yaml", [])  # 64 x 8, L = 3072, mix 0.5, cut U[0.2, 0.8]
    grpo = expected_workload(cfg, 200, 0.5, 0, "history", soup=False)
    assert grpo.decoded == 64 * 8 * 1536 and grpo.prefilled == 64 * 200 and grpo.history_decoded == 0
    per_sample = expected_workload(cfg, 200, 0.5, 0, "history", soup=True)
    assert per_sample.decoded == 64 * (8 * 1536 - 4 * 768)  # 4 mixed samples cut at 0.5 x 1536 on average
    assert per_sample.history_decoded == 64 * 4 * 1536 and per_sample.longest == grpo.longest == 3072
    shared = expected_workload(cfg, 200, 0.5, 1, "history", soup=True)
    assert shared.history_decoded == per_sample.history_decoded / 4 and shared.decoded == per_sample.decoded
    capped = expected_workload(cfg, 200, 0.5, 1, "max_length", soup=True)
    assert capped.history_steps / capped.history_versions == pytest.approx(0.8 * 3072)  # history stops at cut_max L
    assert capped.decoded == 64 * (8 * 1536 - 4 * 1536)  # E[lambda] L = 1536 = the trajectory's mean length
    assert grpo.trained == shared.trained == capped.trained


def test_recipe_table_and_errors(capsys, tmp_path):
    assert main(["--config", "configs/qwen2.5_math_7b_8xh100.yaml", "--architecture", QWEN]) == 0
    out = capsys.readouterr().out
    for row in ("GRPO", "SOUP before issue 14*", "SOUP history per sample", "SOUP 1 + cut_of=max_length",
                "steps_per_call=2", "dedicated (1 policy, 1 history)", "colocated (2 policy, 2 history)"):
        assert row in out
    assert main(["--config", "configs/qwen2.5_math_7b_8xh100.yaml", "--architecture", QWEN,
                 "--mean-response", "1.5"]) == 2
    assert "--mean-response 1.5: expected a fraction in (0, 1]" in capsys.readouterr().err
    assert main(["--config", "configs/qwen2.5_math_7b_8xh100.yaml", "--architecture", QWEN, "--tau0", "-1"]) == 2
    assert "--tau0 -1.0: expected a number > 0" in capsys.readouterr().err
    assert main(["--config", "configs/qwen2.5_math_7b_8xh100.yaml", "--architecture", QWEN,
                 "--history-servers", "2"]) == 2
    assert "--history-servers 2: the rollout GPUs hold 2 servers" in capsys.readouterr().err
    assert main(["--config", "configs/tiny_cpu.yaml", "--validate", str(tmp_path / "none.json")]) == 2
    assert "no such file (write it with tools/bench_step.py --records FILE)" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"config": "configs/tiny_cpu.yaml", "overrides": [], "warmup": 0,
                                                   "records": {"SOUP": [{}]}}))
    assert main(["--config", "configs/tiny_cpu.yaml", "--validate", str(tmp_path / "bad.json")]) == 2
    assert "no GRPO rows" in capsys.readouterr().err
