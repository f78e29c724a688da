"""Token log-probs and entropy from vocab-parallel logits, never gathering the vocabulary on one rank.

Rank r holds logits z_v for v in its slice [start, start + V_r) of the padded vocabulary. With
m = max_v z_v (all-reduce MAX, no gradient) and S = sum_ranks sum_v exp(z_v - m) (all-reduce SUM):

    log Z = m + log S
    log p(y) = z_y - log Z                z_y taken on the rank that holds y, summed over ranks
    H = log Z - sum_v p_v z_v             sum_v p_v z_v = sum_ranks sum_v exp(z_v - m) z_v / S

Padded vocabulary entries (id >= the true vocabulary size) are set to -inf: never counted. The sums
use megatron's all-reduce whose backward is the identity, correct because every rank computes the
same loss from the reduced values. The sequence is processed in chunks, each recomputed in the
backward pass, so only the logits themselves are kept for the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def _reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


def _chunk(logits, targets, vocab_start: int, vocab_size: int, temperature: float, with_entropy: bool, group):
    local_vocab = logits.shape[-1]
    ids = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device)
    valid = ids < vocab_size
    z = (logits.float() / temperature).masked_fill(~valid, float("-inf"))
    m = z.detach().max(-1).values
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(z - m[..., None])
    s = _reduce_sum(e.sum(-1), group)
    log_z = m + torch.log(s)
    local = targets - vocab_start
    here = (local >= 0) & (local < local_vocab)
    z_target = z.gather(-1, local.clamp(0, local_vocab - 1)[..., None]).squeeze(-1)
    z_target = _reduce_sum(torch.where(here, z_target, torch.zeros_like(z_target)), group)
    logp = z_target - log_z
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    expected_z = _reduce_sum((e * torch.where(valid, z, torch.zeros_like(z))).sum(-1), group) / s
    return logp, log_z - expected_z


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_size: int,
                            temperature: float = 1.0, with_entropy: bool = False, group=None, chunk: int = 1024):
    """`logits` [N, T, V_r] (this rank's vocabulary slice, starting at id `vocab_start`), `targets` [N, T].
    Returns log p(targets) [N, T] and, when asked, the entropy [N, T] (else None)."""
    logps, entropies = [], []
    grad = torch.is_grad_enabled() and logits.requires_grad
    for begin in range(0, logits.shape[1], chunk):
        args = (logits[:, begin: begin + chunk], targets[:, begin: begin + chunk], vocab_start, vocab_size,
                temperature, with_entropy, group)
        lp, ent = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps, 1), (torch.cat(entropies, 1) if with_entropy else None)
