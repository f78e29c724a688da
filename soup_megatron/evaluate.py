"""Held-out evaluation: greedy accuracy and sampled pass@1 of whatever policy an engine serves."""

from __future__ import annotations

from typing import Sequence

from .data.prompts import Prompt
from .reward import RewardFn
from .rollout.base import GenerationRequest, RolloutEngine


def accuracy(engine: RolloutEngine, tokenizer, prompts: Sequence[Prompt], reward_fn: RewardFn, *,
             max_new_tokens: int, temperature: float, samples: int, seed: int) -> float:
    """Mean reward over `samples` generations per prompt (temperature 0: greedy, one is enough)."""
    reqs = [GenerationRequest(tuple(tokenizer.encode(p.text)), (), max_new_tokens) for p in prompts] * samples
    gens = engine.generate(reqs, temperature, seed)
    hits = [reward_fn(tokenizer.decode(g.token_ids, skip_special_tokens=True), p.answer)
            for g, p in zip(gens, list(prompts) * samples)]
    return sum(hits) / len(hits)


def heldout_metrics(engine: RolloutEngine, tokenizer, prompts: Sequence[Prompt], reward_fn: RewardFn, *,
                    max_new_tokens: int, temperature: float, pass_samples: int, seed: int) -> dict[str, float]:
    out = {"heldout/greedy_acc": accuracy(engine, tokenizer, prompts, reward_fn, max_new_tokens=max_new_tokens,
                                          temperature=0.0, samples=1, seed=seed)}
    if pass_samples:
        out["heldout/pass1"] = accuracy(engine, tokenizer, prompts, reward_fn, max_new_tokens=max_new_tokens,
                                        temperature=temperature, samples=pass_samples, seed=seed)
    return out
