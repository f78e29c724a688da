"""Core attention for megatron-core's local layer spec, on torch's scaled_dot_product_attention.

Takes the place of megatron's DotProductAttention, which needs a CUDA memory buffer. Sequences are
right-padded and causal, so padding never reaches a real token and no explicit mask is needed.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **_):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine's attention (a GPU); "
                             "set actor.megatron.context_parallel=1")
        self.scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """[s, b, heads, dim] in, [s, b, heads * dim] out; key/value groups are repeated for GQA."""
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by the SDPA core attention")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=k.shape[1] != q.shape[1])
        seq, batch = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
