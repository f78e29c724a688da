"""Cut-point sampler: bounds, never past the historical EOS, `line` snapping, `cut_of`."""

import math
import random

from soup_megatron.algo.mixing import cut_point, history_length, mixed_count

NL = 10
EOS = 0


def test_mixed_count():
    assert mixed_count(8, 0.5) == 4
    assert mixed_count(8, 0.0) == 0
    assert mixed_count(8, 1.0) == 8
    assert mixed_count(3, 0.5) == 2  # rounds half up


def test_cut_within_bounds_and_before_eos():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 40)
        tokens = [rng.randint(1, 9) for _ in range(n - 1)] + [EOS]
        lo = rng.uniform(0, 1)
        hi = rng.uniform(lo, 1)
        k = cut_point(tokens, True, rng, lo, hi, "token", frozenset({NL}))
        assert math.floor(lo * n) <= k or k == n - 1
        assert k <= min(math.floor(hi * n), n - 1)  # the EOS (last token) never enters the prefix
        assert EOS not in tokens[:k]


def test_unfinished_trajectory_may_be_cut_at_its_end():
    rng = random.Random(1)
    tokens = [1, 2, 3, 4]
    assert cut_point(tokens, False, rng, 1.0, 1.0, "token", frozenset({NL})) == 4
    assert cut_point(tokens + [EOS], True, rng, 1.0, 1.0, "token", frozenset({NL})) == 4


def test_line_snapping_ends_prefix_after_a_newline():
    tokens = [1, 2, NL, 3, 4, 5, NL, 6, 7, EOS]
    rng = random.Random(2)
    for _ in range(200):
        k = cut_point(tokens, True, rng, 0.2, 0.9, "line", frozenset({NL}))
        assert k in (0, 3, 7)
        assert k == 0 or tokens[k - 1] == NL
    # cut_min = cut_max = 0.6 -> token cut 6, snapped back to 3 (just after the first newline)
    assert cut_point(tokens, True, random.Random(0), 0.6, 0.6, "line", frozenset({NL})) == 3
    assert cut_point(tokens, True, random.Random(0), 0.6, 0.6, "token", frozenset({NL})) == 6
    assert cut_point([1, 2, 3, EOS], True, random.Random(0), 0.5, 0.5, "line", frozenset({NL})) == 0


def test_cut_of_max_length_cuts_within_the_generated_history_and_before_eos():
    """k = floor(lambda * L) with L the response budget: history generated up to history_length() tokens
    holds every cut, and a trajectory that ended early is never cut past its EOS."""
    rng = random.Random(3)
    budget = 40
    assert history_length(budget, 0.8, "history") == budget
    assert history_length(budget, 0.8, "max_length") == 32
    assert history_length(3, 0.1, "max_length") == 1  # never an empty history
    for _ in range(2000):
        lo = rng.uniform(0, 1)
        hi = rng.uniform(lo, 1)
        limit = history_length(budget, hi, "max_length")
        n = rng.randint(1, limit)
        finished = rng.random() < 0.5
        tokens = [rng.randint(1, 9) for _ in range(n - finished)] + [EOS] * finished
        k = cut_point(tokens, finished, rng, lo, hi, "token", frozenset({NL}), budget)
        assert k <= min(math.floor(hi * budget), n - finished)
        assert k >= min(math.floor(lo * budget), n - finished)
        assert EOS not in tokens[:k]
