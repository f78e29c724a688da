"""Evaluation: greedy accuracy, unbiased pass@k, and SOUP inference, on any rollout engine.

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
             n: int) -> list[int]:
    """Correct responses per prompt; `responses` are prompt-major, n per prompt."""
    hits = [reward_fn(fmt.response_text(r), prompts[i // n].answer) > 0 for i, r in enumerate(responses)]
    return [sum(hits[i * n:(i + 1) * n]) for i in range(len(prompts))]


def correct_counts(engine: RolloutEngine, fmt: PromptFormat, prompts: Sequence[Prompt], reward_fn: RewardFn, n: int,
                   s: Sampling, prefixes: Optional[Sequence[Sequence[int]]] = None, greedy: bool = False
                   ) -> tuple[list[int], list[Generation]]:
    """Sample n responses per prompt (continuing `prefixes`, prompt-major, when given); correct counts
    per prompt and the generations."""
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
    """Greedy accuracy and pass@k of `engine`'s policy; with `soup`, also the historical policy's pass@k
    and SOUP inference's. Returns summary numbers and the per-prompt correct counts."""
    if any(k > n for k in ks):
        raise ConfigError(f"every k must be <= n (samples per prompt); got k={list(ks)} with n={n}")
    greedy, _ = correct_counts(engine, fmt, prompts, reward_fn, 1, sampling, greedy=True)
    sampled, _ = correct_counts(engine, fmt, prompts, reward_fn, n, sampling)
    result = {"greedy_acc": sum(greedy) / len(prompts), "sampled": mean_pass_at_k(sampled, n, ks)}
    per_prompt = {"greedy": greedy, "sampled": sampled}
    if soup is not None:
        historical, gens = correct_counts(soup.engine, fmt, prompts, reward_fn, n, sampling)
        prefixes = soup.cut_prefixes(gens, sampling.seed)
        mixed, _ = correct_counts(engine, fmt, prompts, reward_fn, n, sampling, prefixes=prefixes)
        result["historical"] = mean_pass_at_k(historical, n, ks)
        result["soup_inference"] = mean_pass_at_k(mixed, n, ks)
        result["soup_inference"]["prefix_len"] = sum(map(len, prefixes)) / len(prefixes)
        per_prompt.update(historical=historical, soup_inference=mixed)
    result["per_prompt"] = [{"uid": p.uid, **{k: v[i] for k, v in per_prompt.items()}} for i, p in enumerate(prompts)]
    return result


def heldout_metrics(engine: RolloutEngine, fmt: PromptFormat, prompts: Sequence[Prompt], reward_fn: RewardFn, *,
                    max_new_tokens: int, temperature: float, pass_samples: int, seed: int) -> dict[str, float]:
    """What the trainer logs every eval_interval steps: greedy accuracy and sampled pass@1."""
    s = Sampling(max_new_tokens, temperature, seed)
    greedy, _ = correct_counts(engine, fmt, prompts, reward_fn, 1, s, greedy=True)
    out = {"heldout/greedy_acc": sum(greedy) / len(prompts)}
    if pass_samples:
        sampled, _ = correct_counts(engine, fmt, prompts, reward_fn, pass_samples, s)
        out["heldout/pass1"] = mean_pass_at_k(sampled, pass_samples, [1])["pass@1"]
    return out
