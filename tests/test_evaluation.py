"""Evaluation: the pass@k estimator, math-verify scoring, benchmark layouts, `eval`, `sweep`, `bench`."""

import json
import re
from fractions import Fraction
from math import comb
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from soup_megatron.cli import main
from soup_megatron.config import ConfigError, load_config
from soup_megatron.data.eval_sets import last_boxed, load_eval_set
from soup_megatron.data.prompt import Prompt
from soup_megatron.data.prompts import DataError
from soup_megatron.evaluate import distinct_solutions, heldout_metrics, mean_pass_at_k, pass_at_k, sampled_metrics
from soup_megatron.experiments.study import load_study, report, run_study
from soup_megatron.reward import math_equivalent
from soup_megatron.rollout.base import Generation

from .conftest import TINY


def test_pass_at_k_equals_the_exact_combinatorial_value():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    assert pass_at_k(100, 1, 100) == 1.0 and pass_at_k(100, 0, 50) == 0.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


EQUIVALENT = [
    ("\\boxed{\\frac{1}{2}}", "0.5"), ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"), ("\\boxed{0.75}", "3/4"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12"), ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{(1,2)}", "(1, 2)"), ("\\boxed{1,000}", "1000"), ("\\boxed{10\\%}", "10"),
    ("\\boxed{5\\text{ cm}}", "5"), ("\\boxed{90^\\circ}", "90"), ("\\boxed{\\$18.90}", "18.90"), ("A: 12", "12"),
]
NOT_EQUIVALENT = [
    ("\\boxed{\\frac{1}{3}}", "0.33"), ("\\boxed{5}", "6"), ("\\boxed{2\\sqrt{2}}", "2"), ("\\boxed{-3}", "3"),
    ("\\boxed{\\pi}", "3.14"), ("no answer here", "5"),
]


def test_pass_at_k_curve_is_monotone_and_the_combinatorial_value():
    n, c, ks = 64, 5, [1, 2, 4, 8, 16, 32, 64]
    curve = mean_pass_at_k([c], n, ks)
    assert list(curve) == [f"pass@{k}" for k in ks]
    assert list(curve.values()) == sorted(curve.values()) and curve["pass@1"] == pytest.approx(c / n)
    for k in ks:
        assert curve[f"pass@{k}"] == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert curve["pass@64"] == 1.0


def test_distinct_correct_solutions_differ_in_more_than_whitespace():
    correct = [["3+4=7", " 3 + 4 = 7\n", "4+3=7"], [], ["x", "x"]]
    assert [distinct_solutions(c) for c in correct] == [2, 0, 1]
    metrics = sampled_metrics(correct, 4, [1, 4])
    assert metrics["distinct_correct"] == 1.0  # (2 + 0 + 1) / 3 problems
    assert metrics["pass@1"] == pytest.approx(5 / 12) and metrics["pass@4"] == pytest.approx(2 / 3)


class CannedEngine:
    """Answers each prompt's requests with its responses in turn (characters as token ids); greedy: the first."""

    version = 0

    def __init__(self, responses: dict[str, list[str]]):
        self.responses, self.served = responses, {}

    def generate(self, requests, temperature, seed):
        out = []
        for r in requests:
            prompt = "".join(map(chr, r.prompt_ids))
            turn = 0 if temperature == 0 else self.served.get(prompt, 0)
            self.served[prompt] = turn + (temperature > 0)
            out.append(Generation(list(map(ord, self.responses[prompt][turn])), [], "stop", 0))
        return out


class CharFormat:
    def prompt_ids(self, text):
        return list(map(ord, text))

    def response_text(self, ids):
        return "".join(map(chr, ids))


def test_heldout_metrics_add_the_pass_at_k_curve_and_distinct_correct_only_when_asked():
    engine = CannedEngine({"a": ["1+2=3", "2+1=3", " 1 + 2 = 3", "1+1=2"], "b": ["0", "1", "2", "3"]})
    prompts = [Prompt("a", "a", "3"), Prompt("b", "b", "9")]
    def reward(text, answer):
        return float(text.split("=")[-1].strip() == answer)

    run = dict(max_new_tokens=8, temperature=1.0, pass_samples=4, seed=0)
    out = heldout_metrics(engine, CharFormat(), prompts, reward, **run, pass_ks=[1, 2, 4])
    assert out["heldout/greedy_acc"] == 0.5
    assert out["heldout/pass@1"] == out["heldout/pass1"] == pytest.approx(3 / 8)  # 3 of a's 4, none of b's
    assert out["heldout/pass@2"] == out["heldout/pass@4"] == 0.5
    assert out["heldout/distinct_correct"] == 1.0  # a: "1+2=3" (twice, spaced differently) and "2+1=3"; b: none
    engine.served.clear()
    assert sorted(heldout_metrics(engine, CharFormat(), prompts, reward, **run)) == ["heldout/greedy_acc",
                                                                                     "heldout/pass1"]


def test_pass_at_k_beyond_the_samples_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        load_config("configs/tiny_cpu.yaml", ["trainer.eval_pass_samples=8", "trainer.eval_pass_k=[1,4,16]"])
    assert str(refused.value) == ("trainer.eval_pass_k=[1, 4, 16] is not allowed; expected every k in "
                                  "[1, trainer.eval_pass_samples=8] (pass@k needs k <= samples)")
    cfg = load_config("configs/tiny_cpu.yaml", ["trainer.eval_pass_samples=64", "trainer.eval_pass_k=[1,2,4,64]"])
    assert cfg.trainer.eval_pass_k == [1, 2, 4, 64] and load_config("configs/tiny_cpu.yaml").trainer.eval_pass_k == []
    with pytest.raises(ValueError, match=r"^pass@k needs 0 <= c <= n and 1 <= k <= n, got n=4 c=1 k=5$"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize("response,answer", EQUIVALENT)
def test_math_verify_accepts_equivalent_answers(response, answer):
    assert math_equivalent(response, answer) == 1.0


@pytest.mark.parametrize("response,answer", NOT_EQUIVALENT)
def test_math_verify_refuses_different_answers(response, answer):
    assert math_equivalent(response, answer) == 0.0


def test_math_verify_drops_units_a_known_limit():
    """math-verify strips unit text before comparing, so 5 cm and 5 m count as equal: benchmarks whose
    answers differ only by unit are not told apart (recorded here so a change of behaviour is seen)."""
    assert math_equivalent("\\boxed{5 \\text{ cm}}", "5 \\text{ m}") == 1.0


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_benchmark_layouts_load_as_published(tmp_path):
    math500 = _jsonl(tmp_path / "math500.jsonl", [
        {"problem": "Compute $1+1$.", "solution": "It is $\\boxed{2}$.", "answer": "2", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/1.json"}])
    aime = _jsonl(tmp_path / "aime24.jsonl",
                  [{"ID": "2024-I-1", "Problem": "Find n.", "Solution": "...", "Answer": 204}])
    amc = tmp_path / "amc.parquet"
    pq.write_table(pa.table({"id": [0, 1], "problem": ["What is 7*10?", "Half of 3?"], "answer": [70.0, 1.5],
                             "url": ["u0", "u1"]}), amc)
    minerva = _jsonl(tmp_path / "minerva.jsonl", [
        {"problem": "Find the ratio.", "solution": "First $\\boxed{1}$, so the ratio is \\boxed{\\frac{3}{4}}.",
         "type": "Physics", "idx": 0}])
    olympiad = _jsonl(tmp_path / "olympiad.jsonl", [
        {"id": 7, "question": "Find all x.", "solution": ["x=1 or x=2"], "final_answer": ["$1$", "$2$"],
         "context": None, "is_multiple_answer": True, "unit": None, "answer_type": "Numerical"}])
    gsm8k = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Sum?", "answer": "3 + 4 = 7\n#### 1,007"}])
    own = _jsonl(tmp_path / "own.jsonl", [{"prompt": "1+2=?\n", "answer": "3"}])

    expected = [(math500, "problem", "2"), (aime, "problem", "204"), (amc, "problem", "70"),
                (minerva, "minerva", "\\frac{3}{4}"), (olympiad, "olympiadbench", "$1$, $2$"),
                (gsm8k, "gsm8k", "1007"), (own, "prompt", "3")]
    for path, layout, answer in expected:
        prompts, detected = load_eval_set(path, template="Q: {prompt}")
        assert detected == layout, path
        assert prompts[0].answer == answer, path
        assert prompts[0].text.startswith("Q: ") and prompts[0].uid == f"{path.name}:1"
    assert load_eval_set(amc)[0][1].answer == "1.5"
    # naming the layout, or the fields, works as detection does
    assert load_eval_set(minerva, layout="minerva")[0][0].answer == "\\frac{3}{4}"
    prompts, layout = load_eval_set(math500, prompt_field="unique_id", answer_field="level")
    assert (layout, prompts[0].text, prompts[0].answer) == ("fields", "test/algebra/1.json", "1")
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}" and last_boxed("none") is None


@pytest.mark.parametrize("rows,message", [
    ([{"problem": "p", "answer": "1"}, {"problem": "p"}], r"bad\.jsonl:2: missing field 'answer'"),
    ([{"problem": "p", "solution": "no box here"}], r"bad\.jsonl:1: field 'solution' has no \\boxed"),
    ([{"question": "q", "final_answer": []}], r"bad\.jsonl:1: field 'final_answer' must be a non-empty list"),
    ([{"question": "q", "answer": "no hashes"}], r"bad\.jsonl:1: field 'answer' has no '#### <answer>' line"),
    ([{"title": "t", "body": "b"}], r"bad\.jsonl:1: cannot tell the benchmark layout from fields \(title, body\)"),
    ([{"problem": "p", "answer": ""}], r"bad\.jsonl:1: field 'answer' is empty"),
    (["just a string"], r"bad\.jsonl:1: expected an object"),
])
def test_malformed_benchmark_rows_are_refused_with_file_and_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_eval_set(_jsonl(tmp_path / "bad.jsonl", rows))


def test_broken_json_line_and_unknown_layout_are_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_eval_set(path)
    with pytest.raises(DataError, match="layout 'aime' is unknown; choose one of: auto, olympiadbench"):
        load_eval_set(_jsonl(tmp_path / "ok.jsonl", [{"problem": "p", "answer": "1"}]), layout="aime")


def test_eval_cli_reports_pass_at_k_and_soup_inference(tiny_model, tmp_path, capsys):
    from soup_megatron.data.arithmetic import make_split

    problems = make_split("heldout", 12, 5, 3, 4, 9)
    data = _jsonl(tmp_path / "sums.jsonl", [{"problem": p.text, "answer": int(p.answer)} for p in problems])
    out = tmp_path / "eval.json"
    args = ["eval", "--config", "configs/tiny_cpu.yaml", "--checkpoint", str(tiny_model), "--data", str(data),
            "--n", "6", "--k", "1,2,6", "--prefix-checkpoint", str(tiny_model), *TINY, f"model.path={tiny_model}"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"].endswith("(problem layout)") and result["reward"] == "math_verify"
    assert len(result["per_prompt"]) == 12
    for mode in ("sampled", "historical", "soup_inference"):
        counts = [row[mode] for row in result["per_prompt"]]
        assert all(0 <= c <= 6 for c in counts)
        assert result[mode]["pass@1"] == pytest.approx(sum(counts) / (6 * 12))  # pass@1 is the mean hit rate
        assert result[mode]["pass@1"] <= result[mode]["pass@2"] <= result[mode]["pass@6"]
        assert result[mode]["pass@6"] == pytest.approx(sum(c > 0 for c in counts) / 12)
        distinct = [row[f"{mode}_distinct"] for row in result["per_prompt"]]
        assert all(min(c, 1) <= d <= c for c, d in zip(counts, distinct))
        assert result[mode]["distinct_correct"] == pytest.approx(sum(distinct) / 12)
    assert result["greedy_acc"] == pytest.approx(sum(row["greedy"] for row in result["per_prompt"]) / 12)
    assert 0 < result["soup_inference"]["prefix_len"] < result["max_new_tokens"]
    assert "SOUP inference" in capsys.readouterr().out

    # the same seed gives the same numbers
    assert main([*args, "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["sampled"] == result["sampled"]
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--n", "1", "--k", "1"]) == 2
    assert "not an HF checkpoint directory" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tiny_model), "--n", "2", "--k", "1,4"]) == 2
    assert "every k <= n" in capsys.readouterr().err


def _study_file(tmp_path, tiny_model, variants, extra="", more_overrides=()):
    overrides = [*TINY, f"model.path={tiny_model}", "trainer.steps=2", "trainer.eval_interval=2",
                 "trainer.eval_pass_samples=2", "trainer.eval_pass_k=[1,2]", "trainer.save_interval=1", *more_overrides]
    path = tmp_path / "study.yaml"
    path.write_text(f"base: configs/tiny_cpu.yaml\nout_dir: {tmp_path / 'study'}\nseeds: [1, 2]\n"
                    f"overrides: {json.dumps(overrides)}\neval: {{n: 2, k: [1, 2]}}\nlast_steps: 2\n"
                    f"variants: {json.dumps(variants)}\n{extra}")
    return str(path)


def test_sweep_runs_every_variant_and_seed_and_does_not_rerun_finished_runs(tiny_model, tmp_path, monkeypatch, capsys):
    path = _study_file(tmp_path, tiny_model, {"grpo": ["soup.mix_fraction=0"], "soup": []})
    study_dir = tmp_path / "study"
    # --variant: one part of the study (another process may run the rest beside it); the report covers what finished
    assert main(["sweep", "--config", path, "--variant", "grpo"]) == 0
    assert "(2 of 4 runs finished)" in (study_dir / "results.md").read_text()
    assert not (study_dir / "soup").exists()
    grpo_done = (study_dir / "grpo" / "seed1" / "result.json").stat().st_mtime_ns
    assert main(["sweep", "--config", path]) == 0  # the rest: soup; grpo's runs are read back
    assert (study_dir / "grpo" / "seed1" / "result.json").stat().st_mtime_ns == grpo_done
    results = json.loads((study_dir / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [("grpo", 1), ("grpo", 2), ("soup", 1), ("soup", 2)]
    grpo = results["summary"]["grpo"]["final/pass@1"]
    assert grpo["values"] == [r["final/pass@1"] for r in results["runs"][:2]]
    assert grpo["mean"] == pytest.approx(sum(grpo["values"]) / 2)
    assert "train/prefix/entropy" in results["summary"]["soup"]
    assert "train/prefix/entropy" not in results["summary"]["grpo"]  # GRPO has no prefix tokens
    table = (study_dir / "results.md").read_text()
    assert "| soup | " in table and "| grpo | 2 |" in table and (study_dir / "study.png").stat().st_size > 0
    assert "Paired by seed, variant minus baseline" in table
    assert "During training, at each held-out evaluation" in table
    start = [line for line in table.splitlines() if line.startswith("| grpo | 0 | ")]  # step 0: no training yet
    assert len(start) == 1 and start[0].count("|") == 9 and start[0].endswith("| - | - |")  # 6 curves: pass@2 too
    paired = [line for line in table.splitlines() if line.startswith("| soup | grpo | 2 | ")]
    assert len(paired) == 1 and len(re.findall(r"\[[-+]\d\.\d{3}, [-+]\d\.\d{3}\] .*?\(\d/2\)", paired[0])) == 4, table
    assert "results.md" in capsys.readouterr().err  # logged
    # `eval --checkpoint RUN_DIR` evaluates the run's latest trainer checkpoint
    assert main(["eval", "--checkpoint", str(study_dir / "soup" / "seed1"), "--n", "1", "--k", "1",
                 "--out", str(tmp_path / "run.json"), *TINY, f"model.path={tiny_model}"]) == 0
    assert json.loads((tmp_path / "run.json").read_text())["checkpoint"].endswith("step_000002/actor/model")

    # finished runs are read back, not trained again
    import soup_megatron.train.trainer

    monkeypatch.setattr(soup_megatron.train.trainer, "Trainer",
                        lambda cfg: pytest.fail("a finished run was trained again"))
    assert run_study(load_study(path)) == results["runs"]
    # --report: the tables from the runs finished so far (one run's result gone: it has not finished)
    (study_dir / "soup" / "seed2" / "result.json").unlink()
    assert main(["sweep", "--config", path, "--report"]) == 0
    partial = (study_dir / "results.md").read_text()
    assert "(3 of 4 runs finished)" in partial and "Paired by seed" not in partial  # one soup seed: no pair
    assert len(json.loads((study_dir / "results.json").read_text())["runs"]) == 3
    # ... unless its config changed, which is refused with the keys named
    changed = _study_file(tmp_path, tiny_model, {"grpo": ["soup.mix_fraction=0"], "soup": []},
                          more_overrides=["algo.clip_high=0.3"])
    with pytest.raises(ConfigError, match=r"holds a finished run with another config \(algo.clip_high: 0.2 -> 0.3"):
        run_study(load_study(changed))


def test_study_config_errors_are_clear(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="no finished run of this study to report on yet"):
        report(load_study(_study_file(tmp_path, tiny_model, {"soup": []})))
    with pytest.raises(ConfigError, match="equal sample budgets .*grpo: 32, long: 48"):
        load_study(_study_file(tmp_path, tiny_model, {"grpo": ["soup.mix_fraction=0"], "long": ["trainer.steps=3"]}))
    with pytest.raises(ConfigError, match="study variant 'bad': .*soup.prefix_mode='nope' is not allowed"):
        load_study(_study_file(tmp_path, tiny_model, {"bad": ["soup.prefix_mode=nope"]}))
    with pytest.raises(ConfigError, match="allowed keys: base, out_dir"):
        load_study(_study_file(tmp_path, tiny_model, {"soup": []}, extra="sedes: [1]\n"))
    with pytest.raises(ConfigError, match=r"eval.k=\[1, 4\] must be positive and at most eval.n=2"):
        load_study(_study_file(tmp_path, tiny_model, {"soup": []}), ["eval.k=[1,4]"])
    with pytest.raises(ConfigError, match=r"pairs entry \['soup', 'gpro'\]: expected \[variant, baseline\]"):
        load_study(_study_file(tmp_path, tiny_model, {"grpo": ["soup.mix_fraction=0"], "soup": []},
                               extra="pairs: [[soup, gpro]]\n"))
    with pytest.raises(ConfigError, match=r"--variant 'gpro': not a variant of this study \(its variants: soup\)"):
        run_study(load_study(_study_file(tmp_path, tiny_model, {"soup": []})), ["gpro"])
    with pytest.raises(ConfigError, match="variant name 'a/b'"):
        load_study(_study_file(tmp_path, tiny_model, {"a/b": []}))


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").glob("study_*.yaml")))
def test_committed_study_configs_load(path):
    """Every study in configs/ builds (and so validates) each of its runs' configs, with equal sample budgets."""
    study = load_study(path)
    assert study.variants and all(pair[0] in study.variants and pair[1] in study.variants for pair in study.pairs)
