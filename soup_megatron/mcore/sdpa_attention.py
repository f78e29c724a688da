"""Core attention for megatron-core's local layer spec, on torch's scaled_dot_product_attention.

Takes the place of megatron's DotProductAttention, which needs a CUDA memory buffer. Sequences are
right-padded and causal, so padding never reaches a real token and no explicit mask is needed.

Context parallelism (cp ranks): the sequence is cut into 2 cp equal chunks and rank r holds chunks r and
2 cp - 1 - r (`parallel.context_parallel_positions`, megatron's split). Each rank gathers the
keys and values of all ranks and attends from its own queries with a mask built from global
positions: query at position i sees key at position j iff j <= i. The gather's backward sums the
key/value gradients of every rank and keeps this rank's slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from .parallel import context_parallel_positions


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward: sum the gradients over the group, keep this slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)], None


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **_):
        super().__init__(config=config)
        self.scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp = config.context_parallel_size

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """[s, b, heads, dim] in, [s, b, heads * dim] out; key/value groups are repeated for GQA."""
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by the SDPA core attention")
        mask, causal = None, True
        if self.cp > 1:
            from megatron.core import parallel_state as ps

            group = ps.get_context_parallel_group()
            key, value = _GatherSequence.apply(key, group), _GatherSequence.apply(value, group)
            length = key.shape[0]
            mine = context_parallel_positions(length, ps.get_context_parallel_rank(), self.cp)
            every = torch.cat([context_parallel_positions(length, r, self.cp) for r in range(self.cp)])
            mask, causal = (mine[:, None] >= every[None, :]).to(query.device), False
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=k.shape[1] != q.shape[1])
        seq, batch = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
