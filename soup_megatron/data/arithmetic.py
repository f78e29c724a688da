"""Built-in verifiable task: multi-term sums, in one of two styles (`data.arithmetic.style`).

    worked    prompt "17+5+40=?\n", answered one step per line, then an answer line (the tiny model's format,
              scored by `exact`): "17+5=22\n22+40=62\nA: 62"
    question  prompt "What is 17 + 5 + 40?", for pretrained chat models; data.template adds the instruction
              (e.g. "{prompt} Put the final answer in \\boxed{}.") and `math_verify` scores the answer

Seeded and split by a hash of the problem's terms (splits.py), so the held-out set never overlaps the
training set.
"""

from __future__ import annotations

import random

from .prompt import Prompt
from .splits import distinct_problems

ANSWER_PREFIX = "A: "


def _problem(rng: random.Random, min_terms: int, max_terms: int, max_operand: int) -> list[int]:
    return [rng.randint(1, max_operand) for _ in range(rng.randint(min_terms, max_terms))]


def prompt_text(terms: list[int], style: str = "worked") -> str:
    if style == "question":
        return f"What is {' + '.join(map(str, terms))}?"
    return "+".join(map(str, terms)) + "=?\n"


def parse_terms(text: str) -> list[int]:
    """Inverse of `prompt_text` in the `worked` style."""
    return [int(x) for x in text.split("=")[0].split("+")]


def worked_solution(terms: list[int], slip_rng: random.Random | None = None, slip_prob: float = 0.0) -> str:
    """The step-by-step solution. With `slip_prob`, a step's sum is off by one or two (and the slip
    carries on to the answer), as in imperfect human demonstrations."""
    lines, total = [], terms[0]
    for term in terms[1:]:
        step = total + term
        if slip_rng is not None and slip_rng.random() < slip_prob:
            step += slip_rng.choice((-2, -1, 1, 2))
        lines.append(f"{total}+{term}={step}")
        total = step
    return "\n".join(lines) + f"\n{ANSWER_PREFIX}{total}"


def make_split(split: str, size: int, seed: int, min_terms: int, max_terms: int, max_operand: int,
               style: str = "worked") -> list[Prompt]:
    """`size` distinct problems of the `train` or `heldout` split (disjoint by construction)."""
    problems = distinct_problems(
        "arithmetic", split, size, seed, lambda rng: _problem(rng, min_terms, max_terms, max_operand),
        key=prompt_text, accept=lambda terms: terms,  # the worked text: the same split in every style
        described=f"with terms in [{min_terms}, {max_terms}] and operands up to {max_operand}")
    return [Prompt(uid=f"{split}-{i}", text=prompt_text(terms, style), answer=str(sum(terms)))
            for i, terms in enumerate(problems)]


def extract_answer(response: str) -> str | None:
    """The text after the last `A: ` line marker, or None when the response never answered."""
    idx = response.rfind(ANSWER_PREFIX)
    if idx < 0:
        return None
    rest = response[idx + len(ANSWER_PREFIX):].strip()
    return rest.splitlines()[0] if rest else ""
