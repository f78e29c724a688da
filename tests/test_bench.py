"""The step benchmark: paired ratios with bootstrap intervals, equal work by default, a stopping rule; the
study's paired t over seeds."""

import itertools
import json
import math

import pytest
import torch

from soup_megatron.cli import main
from soup_megatron.config import load_config
from soup_megatron.experiments.bench import history_fill_steps, per_trained_sample, tool_main
from soup_megatron.experiments.intervals import paired_difference, paired_ratio, t_quantile, t_two_sided_p

from .conftest import TINY


def exact_bootstrap(base, other):
    """R over every one of the n^n equally likely draws of n paired steps, sorted."""
    n = len(base)
    return sorted(sum(other[i] for i in draw) / sum(base[i] for i in draw)
                  for draw in itertools.product(range(n), repeat=n))


def test_paired_ratio_is_the_bootstrap_of_the_paired_steps():
    base, other = [2.0, 2.2, 1.9, 2.5], [2.4, 2.5, 2.6, 2.6]
    r = paired_ratio(base, other)
    assert r.point == pytest.approx(10.1 / 8.6) and r.steps == 4
    exact = exact_bootstrap(base, other)  # 256 values; the interval's ends lie among their 1.5-3.5% and 96.5-98.5%
    assert exact[int(0.015 * 256)] <= r.low <= exact[int(0.035 * 256)]
    assert exact[int(0.965 * 256)] <= r.high <= exact[int(0.985 * 256)]
    assert paired_ratio(base, other) == r  # seeded: the same steps give the same interval
    same = paired_ratio([1.0, 3.0, 2.0], [1.25, 3.75, 2.5])
    assert same.low == same.high == same.point == pytest.approx(1.25)


def test_pairing_cancels_noise_both_sides_of_a_step_share():
    """Steps whose time varies 8x with the machine, the variant 1.2x GRPO's within +-2% at each step: the
    paired interval is narrow; the same times with the pairs broken (shuffled) give a wide one."""
    g = torch.Generator().manual_seed(0)
    load = [2.0 ** (i % 4) for i in range(24)]
    base = load
    other = [1.2 * x * (1 + 0.02 * (2 * float(torch.rand(1, generator=g)) - 1)) for x in load]
    paired = paired_ratio(base, other)
    assert 1.19 < paired.low < paired.point < paired.high < 1.21 and paired.half_width < 0.01
    broken = paired_ratio(base, [other[i] for i in torch.randperm(24, generator=g).tolist()])
    assert broken.half_width > 10 * paired.half_width


def test_paired_t_over_seeds_gives_the_textbook_interval_and_p():
    """Student's t from the incomplete beta: the tables' t_{0.975} (12.706 for 1 degree of freedom, 2.776 for 4),
    the Cauchy distribution's p at 1 dof, and a paired example worked by hand."""
    assert t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.95, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.95, 10_000) == pytest.approx(1.9602, abs=1e-3)
    for t in (0.3, 1.0, 4.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-12)
    # differences 0.5, 0.2, 0.1, 0.9, 0.3: mean 0.4, sd sqrt(0.1), t = 0.4 / (sqrt(0.1) / sqrt(5)) = 2.828
    d = paired_difference([1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.2, 3.1, 4.9, 5.3])
    half = 2.776445 * math.sqrt(0.1) / math.sqrt(5)
    assert d.mean == pytest.approx(0.4) and d.t == pytest.approx(2.828427, abs=1e-6)
    assert (d.low, d.high) == (pytest.approx(0.4 - half, abs=1e-6), pytest.approx(0.4 + half, abs=1e-6))
    assert 0.045 < d.p < 0.05 and (d.wins, d.n) == (5, 5)
    assert paired_difference([0.5, 0.6], [0.5, 0.6]).p == 1.0  # no difference at all
    same_shift = paired_difference([0.5, 0.6], [0.6, 0.7])  # no spread: no test, and the table says so
    assert math.isnan(same_shift.p) and str(same_shift) == "+0.100 [+0.100, +0.100] no spread (2/2)"
    with pytest.raises(ValueError, match="2 baseline results against 1"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 seeds, got 1"):
        paired_difference([1.0], [1.0])


def test_paired_ratio_refuses_unpaired_or_too_few_steps():
    with pytest.raises(ValueError, match="3 base steps against 2"):
        paired_ratio([1.0, 1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least 3 paired steps, got 2"):
        paired_ratio([1.0, 1.0], [1.0, 1.0])


def test_train_time_per_trained_sample():
    records = [{"time/train": 2.0, "train/samples_trained": 8.0}, {"time/train": 0.5, "train/samples_trained": 0.0}]
    assert per_trained_sample(records) == [0.25, 0.5]  # a step that trained nothing counts its whole time


def test_bench_stops_at_its_step_limit_when_the_target_is_not_reached_and_trains_every_sample(tiny_model, tmp_path,
                                                                                             capsys):
    """Half the prompts' groups have all-equal rewards, so in a learning run their samples get no pass; under
    the benchmark's default conditions every sample of every variant is trained, at every step. A target no
    run can reach runs to --max-steps and says so."""
    half_equal = [*TINY, f"model.path={tiny_model}", "reward.function=tests.helpers:half_constant_reward"]
    records = tmp_path / "steps.json"
    assert main(["bench", "--only", "step", "--steps", "4", "--warmup", "1", "--target-ci", "1e-9", "--max-steps",
                 "5", "--variant", "SOUP", "--variant", "SOUP one-step-off", "--records", str(records),
                 *half_equal]) == 0
    out = capsys.readouterr().out
    words = " ".join(out.split())  # rich wraps titles and captions to the table's width
    assert "policy frozen (actor.lr=1e-12 algo.entropy_coef=1e-12)" in words
    assert "paired steps 2-5" in words and "NOT reached within --max-steps 5" in words
    assert "│ SOUP one-step-off" in out and "│ SOUP lookahead" not in out
    grpo_row = next(line for line in out.splitlines() if line.startswith("│ GRPO"))
    assert grpo_row.count("1.000 [1.000, 1.000]") == 2  # GRPO against itself: step time, train time per sample
    assert "│ 4 " in grpo_row.replace("│ GRPO", "")  # the figures rest on 4 paired steps

    data = json.loads(records.read_text())
    assert data["overrides"][:2] == ["actor.lr=1e-12", "algo.entropy_coef=1e-12"]  # what --validate loads
    assert set(data["records"]) == {"GRPO", "SOUP", "SOUP one-step-off"}
    for recs in data["records"].values():
        assert [r["train/samples_trained"] for r in recs] == [16.0] * 5
    # the history worker's leftover work is waited for after each step and counted in that step
    assert all(r["time/history_drain"] == pytest.approx(0, abs=0.01) for r in data["records"]["GRPO"])
    assert all(r["time/step"] >= r["time/train"] + r["time/history_drain"] for r in data["records"]["SOUP"])

    assert tool_main("step", "", ["--steps", "4", "--warmup", "1", "--variant", "SOUP", "--learning",
                                  "--records", str(records), *half_equal]) == 0
    learning = json.loads(records.read_text())["records"]
    assert "policy learning" in " ".join(capsys.readouterr().out.split())
    assert any(r["train/samples_trained"] < 16 for recs in learning.values() for r in recs)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "3", "--warmup", "1"], "--steps 3 with --warmup 1 leaves 2 measured step(s); an interval needs at "
                                        "least 3: --steps 4 or more"),
    (["--steps", "2", "--warmup", "2"], "--steps 2 must be larger than --warmup 2"),
    (["--variant", "SOUP turbo"], "--variant 'SOUP turbo' is not a benchmark variant; choose from: GRPO,"),
    (["--target-ci", "0"], "--target-ci 0.0 must be > 0 (the half-width of the ratio's interval, e.g. 0.05)"),
    (["--steps", "6", "--max-steps", "5"], "--max-steps 5 must be at least --steps 6"),
    (["--steps", "20"], "--steps 20 must be larger than --warmup 34 (the default: until every variant's history "
                        "pool is full, history.interval x (history.keep - 1) + soup.lookahead + "
                        "soup.history_steps_per_call)"),
])
def test_bad_benchmark_flags_are_one_line_errors(argv, message, capsys):
    assert tool_main("step", "", argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_command_refuses_a_warmup_as_long_as_the_run():
    assert main(["bench", "--steps", "1", "--warmup", "1"]) == 2


def test_the_default_warmup_lasts_until_the_history_pool_is_full():
    """configs/tiny_cpu.yaml: a checkpoint every 10 steps, 4 kept, lookahead 2: the prefixes of step 33 on (0-based)
    come from 4 versions, those before from fewer (cheaper than a run's steady state)."""
    def fill(*overrides):
        return history_fill_steps(load_config("configs/tiny_cpu.yaml", list(overrides)))

    assert fill() == 10 * 3 + 2 + 1
    assert fill("soup.history_steps_per_call=2") == 34  # a job of two steps is made a step further ahead
    assert fill("history.keep=1", "soup.lookahead=0") == 1
    assert fill("soup.mix_fraction=0") == 0 and fill("soup.prefix_source=replay") == 0  # no historical checkpoint
