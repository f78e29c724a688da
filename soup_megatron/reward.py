"""Verifiers: the reward of a whole response (prefix + continuation) against the prompt's answer.

- `exact`: the arithmetic task's answer line (`A: <n>`) must equal the answer exactly.
- `countdown`: the countdown task's exact verifier (data/countdown.py): the response's worked lines, or its
  last `\\boxed{}` expression, must reach the target with the given numbers; the answer is "target|numbers".
- `math_verify`: Hugging Face's math-verify parses both sides (LaTeX, fractions, expressions) and
  checks mathematical equivalence; the gold answer is wrapped in `$...$` when it has no delimiters.
- `custom`: `module:function(response: str, answer: str) -> float`, imported by path.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .config import ConfigError, RewardConfig
from .data import countdown
from .data.arithmetic import extract_answer

RewardFn = Callable[[str, str], float]


def exact_answer(response: str, answer: str) -> float:
    got = extract_answer(response)
    return 1.0 if got is not None and got == answer.strip() else 0.0


def countdown_reached(response: str, answer: str) -> float:
    return 1.0 if countdown.verify(response, answer) else 0.0


def math_equivalent(response: str, answer: str) -> float:
    from math_verify import parse, verify

    gold_text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    gold = parse(gold_text)
    pred = parse(response)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0


def import_reward(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward.function={spec!r}: cannot import module '{module_name}': {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward.function={spec!r}: module '{module_name}' has no callable '{attr}'")
    return fn


def build_reward(cfg: RewardConfig) -> RewardFn:
    if cfg.type == "exact":
        return exact_answer
    if cfg.type == "math_verify":
        return math_equivalent
    if cfg.type == "countdown":
        return countdown_reached
    return import_reward(cfg.function)
