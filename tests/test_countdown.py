"""The countdown task: seeded disjoint splits of solvable problems, an exact verifier, demonstrations of one
family for a warm start with little diversity, and one-line errors for bad settings."""

import re
from collections import Counter
from itertools import combinations

import pytest

from soup_megatron.config import ConfigError, CountdownConfig, RewardConfig, load_config
from soup_megatron.data.countdown import (
    answer_text,
    count_solutions,
    demonstration,
    make_problems,
    make_split,
    one_expression,
    parse_answer,
    prompt_text,
    verify,
)
from soup_megatron.data.prompts import DataError, load_splits
from soup_megatron.model.warm_start import demonstrations
from soup_megatron.reward import build_reward
from tests.conftest import TINY_SHAPE

CONFIG = "configs/countdown_tiny_cpu.yaml"
TASK = CountdownConfig()
ANSWER = answer_text((7, 3, 11, 4), 40)


def question_numbers(prompt: str) -> tuple[tuple[int, ...], int]:
    """(numbers, target) of a question-style prompt."""
    match = re.match(r"Using the numbers ([0-9, and]+), each at most once, .* make ([0-9]+)\.", prompt)
    return tuple(int(n) for n in re.findall(r"[0-9]+", match[1])), int(match[2])


def is_chain(numbers: tuple[int, ...], response: str) -> bool:
    """Whether every step after the first joins the previous result and a given number not used yet."""
    unused, previous = Counter(numbers), None
    for line in response.splitlines():
        expression, _, result = line.partition("=")
        op = next(c for c in "+-*/" if c in expression)
        operands = Counter(int(x) for x in expression.split(op))
        if previous is not None:
            if not operands[previous]:
                return False
            operands[previous] -= 1
        if operands - unused:
            return False
        unused -= operands
        previous = int(result)
    return previous is not None


def test_splits_are_disjoint_seeded_and_every_problem_is_solvable():
    train = make_problems("train", 300, 1, TASK)
    held = make_problems("heldout", 60, 1, TASK)
    key = {p: (tuple(sorted(p.numbers)), p.target) for p in train + held}
    assert len({key[p] for p in train}) == 300 and not {key[p] for p in train} & {key[p] for p in held}
    assert make_problems("train", 300, 1, TASK) == train and make_problems("train", 300, 2, TASK) != train
    for p in train + held:
        assert TASK.min_numbers <= len(p.numbers) == len(set(p.numbers)) <= TASK.max_numbers
        assert max(p.numbers) <= TASK.max_number and TASK.min_target <= p.target <= TASK.max_target
        assert p.target not in p.numbers
        assert p.solutions == count_solutions(p.numbers, p.target) >= TASK.min_solutions
        assert verify(demonstration(p.numbers, p.target, "first"), answer_text(p.numbers, p.target))
    assert make_split("train", 3, 1, TASK)[0].text == prompt_text(train[0].numbers, train[0].target)
    assert parse_answer(make_split("train", 3, 1, TASK)[0].answer) == (train[0].numbers, train[0].target)


def test_question_style_asks_in_words_over_the_same_split():
    worked = make_split("heldout", 20, 1, TASK)
    asked = make_split("heldout", 20, 1, CountdownConfig(style="question"))
    assert [p.answer for p in asked] == [p.answer for p in worked]
    assert prompt_text((7, 3, 11, 4), 40) == "7 3 11 4 -> 40\n"
    assert prompt_text((7, 3, 11, 4), 40, "question") == (
        "Using the numbers 7, 3, 11 and 4, each at most once, with +, -, *, / and parentheses, make 40. "
        "Put the expression in \\boxed{}.")


def test_solver_counts_distinct_solutions():
    # 3*2, and 3+2+1 three ways ((3+2)+1, (3+1)+2, (2+1)+3); no-ops such as 3*2*1 do not count
    assert count_solutions((1, 2, 3), 6) == 4
    assert count_solutions((2, 3), 6) == count_solutions((3, 2), 6) == 1
    assert count_solutions((2, 3), 7) == 0
    assert demonstration((1, 2, 3), 6, "first") == "3*2=6"
    assert demonstration((1, 2, 3, 6), 32, "first") == "6+2=8\n3+1=4\n8*4=32"  # (6+2)*(3+1), its only solution
    assert demonstration((1, 2, 3, 6), 32, "chain") is None


@pytest.mark.parametrize("response", [
    "7+3=10\n10*4=40",
    "3+7=10\n4*10=40",  # either operand first
    "11*4=44\n44-7=37\n37+3=40",
    "(7+3)*4=40",  # a whole expression on one line
    "4*(3+7)=40",
    "((7+3))*4=40\n",
    "7 + 3 = 10\n10 * 4 = 40",
    "11*4=44\n44-(7-3)=40",  # a later line may group its numbers
    "\\boxed{(7+3)*4}",
    "The answer is \\boxed{(7 + 3) \\times 4 = 40}.",
    "7+3=10\nso \\boxed{4 \\cdot (7+3)}",  # the last \\boxed{} is what counts
])
def test_verifier_accepts_every_correct_form(response):
    assert verify(response, ANSWER)
    assert build_reward(RewardConfig(type="countdown"))(response, ANSWER) == 1.0


@pytest.mark.parametrize("response", [
    "",
    "7+3=10\n10*4=41",  # a wrong step
    "7+3=10\n10*3=30",  # 3 used twice
    "7+3=10\n10*4=40\n40+1=41",  # ends off the target
    "11*4=44\n44-4=40",  # 4 given once
    "5*8=40",  # numbers not given
    "7+3=10\n\n10*4=40",  # a blank line
    "7+3=10\n10*4=40\nA: 40",  # a line that is not a step
    "7+3=10\n10*4",  # no result
    "(7+3)*4",
    "7+3=10\n10*4=040=40",
    "7+3=10\n10*4=40.0",
    "11-7-4=0\n3/0=0",  # division by zero
    "-7+3=-4",  # no signs
    "7**2=49",
    "(7+3)//1*4=40",
    "__import__('os')=40",
    "(" * 300 + "7+3" + ")" * 300 + "*4=40",  # nested past Python's parser limit: refused, not a crash
    "7" * 5000 + "=7",  # a number too long to read: refused, not a crash
    "7+3=10\n10*4=\x1f40",  # a control byte Python counts as whitespace (the tiny model wrote one): refused
    "\\boxed{40}",  # the target, not an expression of the numbers
    "\\boxed{(7+3)*4 = 41}",
    "\\boxed{(7+3)*3}",
    "\\boxed{x}",
])
def test_verifier_refuses_wrong_and_malformed_responses(response):
    assert not verify(response, ANSWER)
    assert build_reward(RewardConfig(type="countdown"))(response, ANSWER) == 0.0


def test_verifier_is_exact_within_a_line():
    assert verify("8/3*6=16", answer_text((8, 3, 6), 16))
    assert not verify("8/3=2\n2*6=12\n12+4=16", answer_text((8, 3, 6, 4), 16))


@pytest.mark.parametrize("family", ["first", "chain"])
def test_demonstrations_are_correct_and_of_their_family(family):
    cfg = load_config(CONFIG, ["data.train_size=200", f"data.countdown.demo_family={family}"])
    pairs = demonstrations(cfg, 200, "rl_train")
    assert len(pairs) >= 190  # a chain cannot solve every problem
    shapes = Counter()
    for prompt, response in pairs:
        given, target = prompt.split(" -> ")
        numbers, target = tuple(map(int, given.split())), int(target)
        assert verify(response, answer_text(numbers, target))
        assert response == demonstration(numbers, target, family)
        used = len(response.splitlines()) + 1  # each step joins two values into one
        assert not any(count_solutions(fewer, target) for fewer in combinations(numbers, used - 1) if len(fewer) > 1)
        shapes[is_chain(numbers, response)] += 1
    if family == "chain":
        assert set(shapes) == {True}
    else:
        assert shapes[False] > 0  # the first solution is not always a chain: the families differ


def test_unseen_demonstrations_avoid_the_problems_rl_trains_on_for_every_run_seed():
    """sft_problems=unseen takes the demonstrations from past the first data.train_size training problems, and
    data.problems_seed keeps those problems the same whatever the run's seed."""
    from soup_megatron.data.prompts import load_splits

    sizes = ["data.train_size=100", "data.problems_seed=1"]
    demos = {prompt for prompt, _ in demonstrations(load_config(CONFIG, sizes), 300, "unseen")}
    shared = {prompt for prompt, _ in demonstrations(load_config(CONFIG, sizes), 300, "rl_train")}
    assert len(demos) > 250 and len(shared) > 250
    for seed in (1, 2):
        cfg = load_config(CONFIG, [*sizes, f"seed={seed}"])
        train, heldout = load_splits(cfg.data, cfg.seed)
        rl = {p.text for p in train}
        assert len(rl) == 100 and not rl & demos and not {p.text for p in heldout} & demos
        assert len(rl & shared) > 90  # rl_train: RL's problems were demonstrated (where a chain solves them)
    other = load_config(CONFIG, [*sizes, "data.problems_seed=null", "seed=2"])
    assert {p.text for p in load_splits(other.data, other.seed)[0]} != rl  # the run's seed draws its own


def test_question_style_demonstrations_box_one_correct_expression():
    """In words for a chat model: the worked lines, then their one expression in \\boxed{}, which the verifier
    reads alone (the lines removed, it still reaches the target with each number at most once)."""
    cfg = load_config(CONFIG, ["data.train_size=200", "data.countdown.style=question"])
    pairs = demonstrations(cfg, 200, "rl_train")
    assert len(pairs) >= 190
    for prompt, response in pairs:
        numbers, target = question_numbers(prompt)
        *lines, boxed = response.splitlines()
        assert lines == demonstration(numbers, target, "chain").splitlines() and boxed.startswith("\\boxed{")
        assert verify(boxed, answer_text(numbers, target)), (prompt, response)
    assert one_expression((10, 5, 2), ("5*2=10", "10+10=20")) == "5*2+10"  # the result, not the given 10
    assert one_expression((9, 4, 2), ("4+2=6", "9-6=3")) == "9-(4+2)"
    assert one_expression((9, 4, 2), ("9-4=5", "5*2=10")) == "(9-4)*2"


def test_countdown_tiny_model_prepares(tmp_path):
    """The warm start runs on the countdown demonstrations (two SFT steps of the test model's shape)."""
    from soup_megatron.model.tiny import prepare_tiny_model

    cfg = load_config(CONFIG, [*TINY_SHAPE, "model.tiny.sft_steps=2", f"model.path={tmp_path / 'model'}"])
    assert (prepare_tiny_model(cfg, progress=False) / "config.json").is_file()
    with pytest.raises(ConfigError, match="in its worked style; set data.source=arithmetic or countdown"):
        prepare_tiny_model(load_config(CONFIG, ["data.countdown.style=question"]), progress=False)


def test_warm_start_fine_tunes_another_checkpoint_on_the_question_demonstrations(tiny_model, tmp_path):
    """model.source=warm_start: the prepared checkpoint at model.warm_start.base, fine-tuned on the question-style
    demonstrations (two steps here), saved at model.path; the base is left as it was. Refused in one line: no
    base set, a base with no checkpoint, the base as its own output."""
    import torch

    from soup_megatron.model.hf import read_state_dict
    from soup_megatron.model.prepare import prepare_model

    out = tmp_path / "warm"
    warm = ["data.countdown.style=question", "data.train_size=50", "model.source=warm_start",
            f"model.warm_start.base={tiny_model}", "model.warm_start.steps=2", "model.warm_start.batch_size=4",
            "model.warm_start.examples=20", f"model.path={out}"]
    before = read_state_dict(tiny_model)
    assert prepare_model(load_config(CONFIG, warm), progress=False) == out
    after = read_state_dict(out)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before[k], v) for k, v in read_state_dict(tiny_model).items())
    with pytest.raises(ConfigError, match="model.warm_start.base='' is not allowed; expected set when "
                                          "model.source=warm_start"):
        load_config(CONFIG, ["model.source=warm_start"])
    with pytest.raises(ConfigError, match=f"model.warm_start.base={tmp_path / 'none'}: no checkpoint there"):
        prepare_model(load_config(CONFIG, [*warm, f"model.warm_start.base={tmp_path / 'none'}"]), progress=False)
    with pytest.raises(ConfigError, match="is model.path: the warm start writes a new checkpoint"):
        prepare_model(load_config(CONFIG, [*warm, f"model.path={tiny_model}"]), progress=False)


@pytest.mark.parametrize("override,message", [
    ("data.source=maze", "data.source='maze' is not allowed; choose one of: arithmetic, countdown, file"),
    ("data.countdown.demo_family=random",
     "data.countdown.demo_family='random' is not allowed; choose one of: first, chain"),
    ("data.countdown.style=essay", "data.countdown.style='essay' is not allowed; choose one of: worked, question"),
    ("data.countdown.min_numbers=1", "data.countdown.min_numbers=1 is not allowed; expected >= 2"),
    ("data.countdown.max_numbers=7", "data.countdown.max_numbers=7 is not allowed; expected <= 6"),
    ("data.countdown.max_number=3",
     "data.countdown.max_number=3 is not allowed; expected >= data.countdown.max_numbers"),
    ("data.countdown.min_target=200", "data.countdown.min_target=200 is not allowed; expected >= 1 and <="),
    ("data.countdown.min_solutions=0", "data.countdown.min_solutions=0 is not allowed; expected >= 1"),
    ("reward.type=exact",
     "reward.type='exact' is not allowed; expected countdown (or custom) with data.source=countdown"),
    ("model.tiny.sft_slip_prob=0.25",
     "model.tiny.sft_slip_prob=0.25 is not allowed; expected 0 with data.source=countdown"),
])
def test_bad_countdown_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_countdown_reward_needs_countdown_answers():
    with pytest.raises(ConfigError, match="reward.type='countdown' is not allowed; expected exact, math_verify or"):
        load_config("configs/tiny_cpu.yaml", ["reward.type=countdown"])
    with pytest.raises(DataError, match=r"answer '7' is not 'target\|numbers'"):
        verify("3+4=7", "7")


def test_a_difficulty_with_no_solvable_problem_is_refused_in_one_line():
    cfg = load_config(CONFIG, ["data.train_size=20", "data.countdown.min_numbers=2", "data.countdown.max_numbers=2",
                               "data.countdown.max_number=3", "data.countdown.min_target=50",
                               "data.countdown.max_target=60"])
    with pytest.raises(DataError) as err:
        load_splits(cfg.data, cfg.seed)
    assert str(err.value) == (
        "data.countdown: cannot find 20 distinct train problems with min_numbers=2, max_numbers=2, max_number=3, "
        "min_target=50, max_target=60, each with min_solutions=2 or more; widen the task or ask for fewer")
