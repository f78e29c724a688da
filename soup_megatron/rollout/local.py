"""In-process rollout engine on `transformers`: batched sampling with a KV cache.

Finished rows leave the batch (their cache rows are dropped once a quarter of the batch is done), so
a batch whose rows need fewer new tokens, as SOUP continuations do, costs fewer decode FLOPs than a
batch of full on-policy samples. With `return_routing` (a mixture-of-experts model, for routing replay)
each generation also carries the experts every layer chose for each position it computed: the context's
in the prefill, then each generated token but the last as it is fed back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..model.hf import (
    load_model,
    load_tokenizer,
    load_weights_into,
    pad_rows,
    pad_token_id,
    stop_token_ids,
    token_logprobs,
)
from ..model.routing import RoutingTap
from .base import Generation, GenerationRequest, WeightSource


class LocalEngine:
    def __init__(self, model_path: str | Path, version: int = 0, max_batch: int = 256, return_routing: bool = False):
        self.model = load_model(model_path)
        self.routing = RoutingTap(self.model) if return_routing else None
        tokenizer = load_tokenizer(model_path)
        self.pad_id = pad_token_id(tokenizer)
        self.stop_ids = stop_token_ids(model_path, tokenizer)  # a response ends at any of them
        self._stop_tensor = torch.tensor(sorted(self.stop_ids))
        self.version = version
        self.max_batch = max_batch

    def load_weights(self, source: WeightSource, version: int) -> None:
        load_weights_into(self.model, source)
        self.version = version

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], temperature: float, seed: int) -> list[Generation]:
        gen = torch.Generator().manual_seed(seed)
        out: list[Generation] = []
        for start in range(0, len(requests), self.max_batch):
            out.extend(self._generate_batch(requests[start: start + self.max_batch], temperature, gen))
        return out

    def _generate_batch(self, requests, temperature: float, gen: torch.Generator) -> list[Generation]:
        n = len(requests)
        contexts = [list(r.prompt_ids) + list(r.prefix_ids) for r in requests]
        ids, mask = pad_rows(contexts, self.pad_id, left=True)  # every row's next token in the last column
        budget = torch.tensor([r.max_new_tokens for r in requests])
        results = [Generation([], [], "length", self.version) for _ in requests]
        active = torch.arange(n)[budget > 0]
        if len(active) == 0:
            return results
        ids, mask, budget = ids[active], mask[active], budget[active]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        step_ids, step_pos = ids, positions
        produced = 0
        finished = torch.zeros(len(active), dtype=torch.bool)
        routed: dict[int, list[torch.Tensor]] = {idx: [] for idx in active.tolist()}
        while True:
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                             past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            if self.routing is not None:
                self._keep_routing(routed, active, finished, mask, step_ids.shape[1])
            logits = out.logits[:, -1].float()
            if temperature > 0:
                logp_all = F.log_softmax(logits / temperature, dim=-1)
                token = torch.multinomial(logp_all.exp(), 1, generator=gen).squeeze(-1)
            else:
                logp_all = F.log_softmax(logits, dim=-1)
                token = logp_all.argmax(-1)
            logp = logp_all.gather(-1, token[:, None]).squeeze(-1)
            produced += 1
            # one conversion per step, not per row: this loop runs once for every decoded token
            for idx, done, tok, lp in zip(active.tolist(), finished.tolist(), token.tolist(), logp.tolist()):
                if done:
                    continue
                res = results[idx]
                res.token_ids.append(tok)
                res.logprobs.append(lp)
                if tok in self.stop_ids:
                    res.finish_reason = "stop"
            finished |= torch.isin(token, self._stop_tensor) | (budget <= produced)
            if finished.all():
                break
            # drop finished rows only when a quarter of the batch is done: compacting the KV cache
            # copies all of it, so doing it for every single finished row costs more than it saves
            if finished.sum() * 4 >= len(active):
                keep = (~finished).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                active, mask, budget, token = active[keep], mask[keep], budget[keep], token[keep]
                step_pos, finished = step_pos[keep], finished[keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], dim=1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = token[:, None]
        for idx, parts in routed.items():
            if self.routing is not None:
                results[idx].routing = torch.cat(parts)
        return results

    def _keep_routing(self, routed: dict, active: torch.Tensor, finished: torch.Tensor, mask: torch.Tensor,
                      width: int) -> None:
        """The experts of the positions just computed that the row's sample needs: its whole (left-padded)
        context in the prefill, then the fed-back token of each row still generating (a row's last token
        is never fed back: it predicts nothing)."""
        chosen = self.routing.take(len(active), width)
        prefill = width > 1
        for row, (idx, done) in enumerate(zip(active.tolist(), finished.tolist())):
            if prefill:
                routed[idx].append(chosen[row, width - int(mask[row].sum()):])
            elif not done:
                routed[idx].append(chosen[row])

    @torch.no_grad()
    def score(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
              temperature: float) -> list[list[float]]:
        rows = [list(c) + list(t) for c, t in zip(contexts, targets)]
        ids, mask = pad_rows(rows, self.pad_id)
        logp, _ = token_logprobs(self.model, ids, mask, temperature)
        return [logp[i, len(c) - 1: len(c) - 1 + len(t)].tolist() for i, (c, t) in enumerate(zip(contexts, targets))]

    def stats(self) -> dict[str, float]:
        return {}  # no cache to report on

    def close(self) -> None:
        self.model = None
