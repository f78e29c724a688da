"""Evaluation: greedy accuracy, unbiased pass@k, distinct correct solutions, and SOUP inference, on any rollout engine.

SOUP inference (spec, "Analysis and evaluation"): a historical checkpoint samples a response, it is
cut at k = floor(lambda * L), lambda ~ U[cut_min, cut_max] (the training cut rule, L per `soup.cut_of`),
and the evaluated policy completes the prefix. Its pass@k is reported beside plain sampling of both checkpoints.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

from .algo.mixing import cut_point
from .config import ConfigError
from .data.encoding import PromptFormat
from .data.prompt import Prompt
from .reward import RewardFn
from .rollout.base import Generation, GenerationRequest, RolloutEngine


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    (the product form never builds the large binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Sequence[int], n: int, ks: Sequence[int]) -> dict[str, float]:
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}


def distinct_solutions(correct_texts: Sequence[str]) -> int:
    """How many different solutions a problem's correct responses hold: texts told apart with all whitespace
    removed (no task-specific canonical form: two countdown chains in another order count twice)."""
    return len({"".join(text.split()) for text in correct_texts})


def sampled_metrics(correct: Sequence[Sequence[str]], n: int, ks: Sequence[int]) -> dict[str, float]:
    """From n samples per problem whose correct responses' texts are `correct`: mean pass@k for each k, and the
    explorable space, the mean number of distinct correct solutions per problem (`distinct_correct`)."""
    return {**mean_pass_at_k([len(c) for c in correct], n, ks),
            "distinct_correct": sum(map(distinct_solutions, correct)) / len(correct)}


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn: token budget, temperature, seed, and rows per engine call."""

    max_new_tokens: int
    temperature: float
    seed: int
    batch: int = 512


def _generate(engine: RolloutEngine, requests: list[GenerationRequest], s: Sampling,
              temperature: float) -> list[Generation]:
    out: list[Generation] = []
    for start in range(0, len(requests), s.batch):  # bounded memory; each chunk has its own seed
        out += engine.generate(requests[start:start + s.batch], temperature, s.seed * 100_003 + start)
    return out


def _correct(fmt: PromptFormat, reward_fn: RewardFn, responses: Sequence[Sequence[int]], prompts: Sequence[Prompt],
             n: int) -> list[list[str]]:
    """The correct responses' texts per prompt; `responses` are prompt-major, n per prompt."""
    texts = [fmt.response_text(r) for r in responses]
    return [[t for t in texts[i * n:(i + 1) * n] if reward_fn(t, p.answer) > 0] for i, p in enumerate(prompts)]


def correct_responses(engine: RolloutEngine, fmt: PromptFormat, prompts: Sequence[Prompt], reward_fn: RewardFn,
                      n: int, s: Sampling, prefixes: Optional[Sequence[Sequence[int]]] = None, greedy: bool = False
                      ) -> tuple[list[list[str]], list[Generation]]:
    """Sample n responses per prompt (continuing `prefixes`, prompt-major, when given); the correct ones'
    texts (prefix included) per prompt and the generations."""
    prefixes = prefixes or [()] * (len(prompts) * n)
    requests = [GenerationRequest(fmt.prompt_ids(p.text), tuple(prefixes[i * n + j]),
                                  max(s.max_new_tokens - len(prefixes[i * n + j]), 1))
                for i, p in enumerate(prompts) for j in range(n)]
    gens = _generate(engine, requests, s, 0.0 if greedy else s.temperature)
    responses = [list(r.prefix_ids) + g.token_ids for r, g in zip(requests, gens)]
    return _correct(fmt, reward_fn, responses, prompts, n), gens


@dataclass(frozen=True)
class SoupInference:
    """A historical checkpoint's engine and the cut rule for SOUP-inference prefixes."""

    engine: RolloutEngine
    cut_min: float
    cut_max: float
    cut_at: str = "token"
    newline_ids: frozenset[int] = frozenset()
    cut_length: Optional[int] = None  # L of the cut with soup.cut_of=max_length (None: each response's length)

    def cut_prefixes(self, gens: Sequence[Generation], seed: int) -> list[list[int]]:
        rng = random.Random(f"soup-inference-{seed}")
        return [g.token_ids[:cut_point(g.token_ids, g.finish_reason == "stop", rng, self.cut_min, self.cut_max,
                                       self.cut_at, self.newline_ids, self.cut_length)] for g in gens]


def evaluate(engine: RolloutEngine, fmt: PromptFormat, prompts: Sequence[Prompt], reward_fn: RewardFn, *, n: int,
             ks: Sequence[int], sampling: Sampling, soup: Optional[SoupInference] = None) -> dict:
    """Greedy accuracy, pass@k and distinct correct solutions of `engine`'s policy; with `soup`, also the
    historical policy's and SOUP inference's. Returns summary numbers and the per-prompt counts."""
    if any(k > n for k in ks):
        raise ConfigError(f"every k must be <= n (samples per prompt); got k={list(ks)} with n={n}")
    greedy, _ = correct_responses(engine, fmt, prompts, reward_fn, 1, sampling, greedy=True)
    sampled, _ = correct_responses(engine, fmt, prompts, reward_fn, n, sampling)
    result = {"greedy_acc": sum(map(len, greedy)) / len(prompts), "sampled": sampled_metrics(sampled, n, ks)}
    per_prompt = {"sampled": sampled}
    if soup is not None:
        historical, gens = correct_responses(soup.engine, fmt, prompts, reward_fn, n, sampling)
        prefixes = soup.cut_prefixes(gens, sampling.seed)
        mixed, _ = correct_responses(engine, fmt, prompts, reward_fn, n, sampling, prefixes=prefixes)
        result["historical"] = sampled_metrics(historical, n, ks)
        result["soup_inference"] = sampled_metrics(mixed, n, ks)
        result["soup_inference"]["prefix_len"] = sum(map(len, prefixes)) / len(prefixes)
        per_prompt.update(historical=historical, soup_inference=mixed)
    result["per_prompt"] = [{"uid": p.uid, "greedy": len(greedy[i]), **{k: len(v[i]) for k, v in per_prompt.items()},
                             **{f"{k}_distinct": distinct_solutions(v[i]) for k, v in per_prompt.items()}}
                            for i, p in enumerate(prompts)]
    return result


def heldout_metrics(engine: RolloutEngine, fmt: PromptFormat, prompts: Sequence[Prompt], reward_fn: RewardFn, *,
                    max_new_tokens: int, temperature: float, pass_samples: int, seed: int, pass_ks: Sequence[int] = ()
                    ) -> dict[str, float]:
    """What the trainer logs every eval_interval steps: greedy accuracy and sampled pass@1 from pass_samples
    samples per prompt; with `pass_ks`, from the same samples pass@k for each k (`heldout/pass@{k}`) and the mean
    distinct correct solutions per prompt (`heldout/distinct_correct`)."""
    s = Sampling(max_new_tokens, temperature, seed)
    greedy, _ = correct_responses(engine, fmt, prompts, reward_fn, 1, s, greedy=True)
    out = {"heldout/greedy_acc": sum(map(len, greedy)) / len(prompts)}
    if pass_samples:
        sampled, _ = correct_responses(engine, fmt, prompts, reward_fn, pass_samples, s)
        out["heldout/pass1"] = mean_pass_at_k([len(c) for c in sampled], pass_samples, [1])["pass@1"]
        if pass_ks:
            out.update({f"heldout/{k}": v for k, v in sampled_metrics(sampled, pass_samples, pass_ks).items()})
    return out
