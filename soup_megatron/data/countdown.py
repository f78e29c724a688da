"""Built-in verifiable task where exploration matters: countdown. Reach the target with the given numbers,
each used at most once, and + - * / with parentheses. Two styles (`data.countdown.style`):

    worked    prompt "7 3 11 4 -> 40\n" (the numbers as drawn, then the target), answered one step per line,
              `expression=result`, the last result being the answer (the tiny model's format, short for its
              byte tokenizer): "7+3=10\n10*4=40", or "11*4=44\n44-7=37\n37+3=40", or "(7+3)*4=40"
    question  prompt "Using the numbers 7, 3, 11 and 4, each at most once, with +, -, *, / and parentheses,
              make 40. Put the expression in \\boxed{}." for pretrained chat models; the last \\boxed{}
              holds the expression: "\\boxed{(7+3)*4}", or "\\boxed{(7 + 3) \\times 4 = 40}"

`verify`, reward.type=countdown, is exact and evaluates nothing but numbers, + - * / and parentheses (read
with `ast`, computed with Fractions). A worked line's expression takes its numbers from the given ones and
the earlier lines' results, each at most once; its exact value must equal the line's result, a whole
number in digits, so a line whose value is not whole is refused ("5/2=2"), while within one line, as in a
boxed expression, arithmetic is exact (with 8, 3 and 6 given, "8/3*6=16" is right). The response holds
nothing but its lines. Division by zero, a number not given or used too often, any other character, and a
final value other than the target are refused. The prompt's numbers and target travel in `Prompt.answer` as
"target|numbers" ("40|7,3,11,4"), so a file of countdown problems can carry them the same way.

Every problem kept is solved exhaustively: the solver builds every expression tree over some of the
numbers whose every step gives a positive whole number and is no no-op (x*1, x/1), and counts the distinct
ones (up to the order of each step's operands: the larger is written first); a problem needs
`min_solutions` of them. The warm start's demonstrations (`demo_family`) are one solution per problem:
    first  the solver's first: fewest numbers, then its fixed search order
    chain  the first chain, each step after the first joining the previous result and one more given number,
           ((a op b) op c) op d; a problem with no chain solution has no demonstration
Either way a warm-started policy has seen one way per problem, and chain never shows two intermediate
results combined: its samples lack diversity on purpose, the premise SOUP starts from.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Optional

from ..config import CountdownConfig
from .prompt import DataError, Prompt
from .splits import distinct_problems

Made = dict[int, tuple[int, tuple[str, ...]]]  # value -> (distinct solutions, the first one's steps)


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]  # as drawn and shown
    target: int
    solutions: int  # distinct solutions found by the exhaustive solver


def prompt_text(numbers: tuple[int, ...], target: int, style: str = "worked") -> str:
    if style == "question":
        listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
        return (f"Using the numbers {listed}, each at most once, with +, -, *, / and parentheses, make {target}. "
                "Put the expression in \\boxed{}.")
    return f"{' '.join(map(str, numbers))} -> {target}\n"


def answer_text(numbers: tuple[int, ...], target: int) -> str:
    return f"{target}|{','.join(map(str, numbers))}"


def parse_answer(answer: str) -> tuple[tuple[int, ...], int]:
    """(numbers, target) of an `answer_text`."""
    match = re.fullmatch(r"\s*([0-9]+)\|([0-9]+(?:,[0-9]+)*)\s*", answer)
    if not match:
        raise DataError(f"reward.type=countdown: answer {answer!r} is not 'target|numbers' (e.g. '40|7,3,11,4')")
    return tuple(int(n) for n in match[2].split(",")), int(match[1])


# -- the exhaustive solver

def _combine(out: Made, left: Made, right: Made) -> None:
    """Every step joining a value made of `left`'s numbers with one made of `right`'s (disjoint), into `out`."""
    for a, (count_a, steps_a) in left.items():
        for b, (count_b, steps_b) in right.items():
            hi, lo, steps = (a, b, steps_a + steps_b) if a >= b else (b, a, steps_b + steps_a)
            results = [("+", hi + lo)]
            if hi > lo:
                results.append(("-", hi - lo))
            if lo > 1:
                results.append(("*", hi * lo))
                if hi % lo == 0:
                    results.append(("/", hi // lo))
            for op, value in results:
                known = out.get(value)
                if known is None:
                    out[value] = (count_a * count_b, (*steps, f"{hi}{op}{lo}={value}"))
                else:
                    out[value] = (known[0] + count_a * count_b, known[1])


def _splits(mask: int, chains_only: bool) -> Iterator[tuple[int, int]]:
    """The ways the numbers of `mask` (two or more) divide between a step's two operands, each way once, in
    a fixed order; a chain's step sets one number aside."""
    low = mask & -mask
    for sub in range(1, mask):
        if sub & mask == sub and sub & low and (not chains_only or 1 in (sub.bit_count(), (mask ^ sub).bit_count())):
            yield sub, mask ^ sub


def _solve(numbers: tuple[int, ...], chains_only: bool) -> dict[int, Made]:
    """What each subset of the numbers (a bit mask) makes, fewest numbers first, then by mask."""
    made: dict[int, Made] = {1 << i: {n: (1, ())} for i, n in enumerate(numbers)}
    for mask in sorted(range(1, 1 << len(numbers)), key=lambda m: (m.bit_count(), m)):
        if mask.bit_count() >= 2:
            made[mask] = {}
            for left, right in _splits(mask, chains_only):
                _combine(made[mask], made[left], made[right])
    return made


def _solutions(numbers: tuple[int, ...], target: int, chains_only: bool) -> Iterator[tuple[int, tuple[str, ...]]]:
    """(distinct solutions, the first one's steps) of each subset of two numbers or more that makes `target`."""
    for mask, values in _solve(numbers, chains_only).items():
        if mask.bit_count() >= 2 and target in values:
            yield values[target]


def count_solutions(numbers: tuple[int, ...], target: int) -> int:
    """Distinct solutions (see the module docstring); numbers are told apart by position, and a generated
    problem's numbers are distinct."""
    return sum(count for count, _ in _solutions(numbers, target, chains_only=False))


def demonstration(numbers: tuple[int, ...], target: int, family: str, style: str = "worked") -> Optional[str]:
    """The response the warm start imitates for this problem (see the module docstring), or None: the worked
    lines, and in the question style the same lines followed by their one expression in \\boxed{}."""
    if family not in ("first", "chain"):
        raise ValueError(f"demo family must be 'first' or 'chain', got {family!r}")
    first = next(_solutions(numbers, target, chains_only=family == "chain"), None)
    if first is None:
        return None
    lines = "\n".join(first[1])
    return lines if style == "worked" else f"{lines}\n\\boxed{{{one_expression(numbers, first[1])}}}"


def one_expression(numbers: tuple[int, ...], steps: tuple[str, ...]) -> str:
    """The worked steps ("7+3=10", "10*4=40") as one expression ("(7+3)*4"). Each step consumes two of the
    values at hand, given numbers and earlier results, each once; which of two equal values it takes does not
    change the expression's value, nor that every given number is used at most once."""
    at_hand: list[tuple[int, str, bool]] = [(n, str(n), False) for n in numbers]  # value, expression, compound
    for step in steps:
        left, value = step.split("=")
        op = next(ch for ch in "+-*/" if ch in left)
        hi, lo = (int(x) for x in left.split(op))
        operands = []
        for wanted in (hi, lo):
            index = max((i for i, (v, _, compound) in enumerate(at_hand) if v == wanted),
                        key=lambda i: at_hand[i][2])  # an earlier result before a given number
            operands.append(at_hand.pop(index))
        (_, a, a_compound), (_, b, b_compound) = operands
        a = f"({a})" if a_compound and op in "*/" else a
        b = f"({b})" if b_compound and op != "+" else b
        at_hand.append((int(value), f"{a}{op}{b}", True))
    return at_hand[-1][1]


# -- problems and splits

def make_problems(split: str, size: int, seed: int, task: CountdownConfig) -> list[Problem]:
    """`size` distinct problems of the `train` or `heldout` split (disjoint by construction)."""
    def draw(rng) -> tuple[tuple[int, ...], int]:
        count = rng.randint(task.min_numbers, task.max_numbers)
        return tuple(rng.sample(range(1, task.max_number + 1), count)), rng.randint(task.min_target, task.max_target)

    def accept(drawn: tuple[tuple[int, ...], int]) -> Optional[Problem]:
        numbers, target = drawn
        solutions = 0 if target in numbers else count_solutions(numbers, target)  # no step needed: refused
        return Problem(numbers, target, solutions) if solutions >= task.min_solutions else None

    fields = ", ".join(f"{name}={getattr(task, name)}" for name in
                       ("min_numbers", "max_numbers", "max_number", "min_target", "max_target"))
    return distinct_problems("countdown", split, size, seed, draw,
                             key=lambda drawn: prompt_text(tuple(sorted(drawn[0])), drawn[1]), accept=accept,
                             described=f"with {fields}, each with min_solutions={task.min_solutions} or more")


def make_split(split: str, size: int, seed: int, task: CountdownConfig) -> list[Prompt]:
    return [Prompt(uid=f"{split}-{i}", text=prompt_text(p.numbers, p.target, task.style),
                   answer=answer_text(p.numbers, p.target))
            for i, p in enumerate(make_problems(split, size, seed, task))]


# -- the verifier

_OPERATIONS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_EXPRESSION = re.compile(r"[0-9+\-*/()\s]+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LATEX = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("\\left", ""), ("\\right", ""), ("×", "*"), ("÷", "/"))


def _well_formed(node: ast.expr) -> bool:
    if isinstance(node, ast.BinOp):
        return type(node.op) in _OPERATIONS and _well_formed(node.left) and _well_formed(node.right)
    return isinstance(node, ast.Constant) and type(node.value) is int


def _leaves(node: ast.expr) -> Iterator[int]:
    if isinstance(node, ast.BinOp):
        yield from _leaves(node.left)
        yield from _leaves(node.right)
    else:
        yield node.value


def _value(node: ast.expr) -> Fraction:
    if isinstance(node, ast.BinOp):
        return _OPERATIONS[type(node.op)](_value(node.left), _value(node.right))
    return Fraction(node.value)


def _take(expression: str, pool: Counter) -> Optional[Fraction]:
    """The exact value of `expression` when it is well formed and its numbers are in `pool` (they are then
    taken from it); None otherwise, division by zero included."""
    if not _EXPRESSION.fullmatch(expression) or len(re.findall("[0-9]+", expression)) > sum(pool.values()):
        return None  # the count bounds the tree, so nothing below recurses deeply
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except (SyntaxError, ValueError):  # ValueError: a number too long to read
        return None
    if not _well_formed(tree):
        return None
    used = Counter(_leaves(tree))
    if used - pool:
        return None
    try:
        value = _value(tree)
    except ZeroDivisionError:
        return None
    pool.subtract(used)
    return value


def _boxed_correct(boxed: str, numbers: tuple[int, ...], target: int) -> bool:
    for latex, plain in _LATEX:
        boxed = boxed.replace(latex, plain)
    expression, _, claimed = boxed.partition("=")
    return claimed.strip() in ("", str(target)) and _take(expression, Counter(numbers)) == target


def _lines_correct(response: str, numbers: tuple[int, ...], target: int) -> bool:
    pool, result = Counter(numbers), None
    for line in response.strip().splitlines():
        expression, _, written = line.partition("=")
        whole = re.fullmatch(r"[ \t]*([0-9]+)[ \t]*", written)  # not \s: it takes control bytes a model may write
        if not whole or _take(expression, pool) != int(whole[1]):
            return False
        result = int(whole[1])
        pool[result] += 1
    return result == target


def verify(response: str, answer: str) -> bool:
    """Whether `response` reaches the target of `answer` ("target|numbers"): its last \\boxed{} expression
    when it has one (question style), else its worked lines."""
    numbers, target = parse_answer(answer)
    boxed = _BOXED.findall(response)
    return _boxed_correct(boxed[-1], numbers, target) if boxed else _lines_correct(response, numbers, target)
