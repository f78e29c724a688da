"""HF <-> Megatron weight layout, tensor by tensor.

Each Megatron parameter comes from one or more HF tensors and is split across tensor-parallel ranks:

    linear_qkv    rows of q, k, v regrouped per query group [q_g (heads/groups x dim); k_g; v_g], split by rows
    linear_fc1    [gate_r; up_r] on rank r: gate and up are split by rows separately, then stacked
    linear_proj, linear_fc2                         split by columns (row-parallel)
    word embeddings, output layer                   split by rows after padding the vocabulary with zeros
    norms, a MoE layer's router                     replicated
    a MoE layer's experts                           expert-parallel rank e of ep holds global experts
                                                    e E/ep ... (e + 1) E/ep - 1 as local_experts.0, 1, ...; each
                                                    one's fc1 / fc2 split over tensor-parallel ranks as above

`to_megatron` makes one rank's slice from HF tensors; `to_hf` rebuilds the HF tensors from all ranks' slices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

from .model import Architecture


@dataclass(frozen=True)
class ParamMap:
    megatron: str  # name inside the model chunk, with the chunk-local layer index
    hf: tuple[str, ...]
    kind: str  # qkv | gate_up | column | row | vocab | replicated
    layer: int | None = None  # global layer index (for pipeline placement)
    expert: int | None = None  # a MoE expert's index among this expert-parallel rank's experts


def expert_params(arch: Architecture, layer: int, local: int, ep_rank: int, ep: int) -> list[ParamMap]:
    """The router and this expert-parallel rank's experts of a MoE layer."""
    m, h = f"decoder.layers.{local}.mlp.", f"model.layers.{layer}.mlp."
    out = [ParamMap(m + "router.weight", (h + "gate.weight",), "replicated", layer)]
    per_rank = arch.num_experts // ep
    for i in range(per_rank):
        mine, hf = f"{m}experts.local_experts.{i}.", f"{h}experts.{ep_rank * per_rank + i}."
        out += [ParamMap(mine + "linear_fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"), "gate_up",
                         layer, i),
                ParamMap(mine + "linear_fc2.weight", (hf + "down_proj.weight",), "row", layer, i)]
    return out


_EXPERT = re.compile(r"\.experts\.\d+\.")


def expert_name(hf_name: str, expert: int) -> str:
    """`hf_name` of an expert's tensor renamed to global expert `expert`'s."""
    return _EXPERT.sub(f".experts.{expert}.", hf_name, count=1)


def layer_params(arch: Architecture, layer: int, local: int, te_spec: bool, ep_rank: int = 0, ep: int = 1
                 ) -> list[ParamMap]:
    m, h = f"decoder.layers.{local}.", f"model.layers.{layer}."
    attn = h + "self_attn."
    out = [
        ParamMap(m + ("self_attention.linear_qkv.layer_norm_weight" if te_spec else "input_layernorm.weight"),
                 (h + "input_layernorm.weight",), "replicated", layer),
        ParamMap(m + "self_attention.linear_qkv.weight",
                 (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), "qkv", layer),
        ParamMap(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "row", layer),
    ]
    if arch.is_moe:  # Transformer Engine fuses the pre-MLP norm into a dense MLP's fc1 only
        out += [ParamMap(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "replicated", layer),
                *expert_params(arch, layer, local, ep_rank, ep)]
    else:
        out += [
            ParamMap(m + ("mlp.linear_fc1.layer_norm_weight" if te_spec else "pre_mlp_layernorm.weight"),
                     (h + "post_attention_layernorm.weight",), "replicated", layer),
            ParamMap(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "gate_up",
                     layer),
            ParamMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "row", layer),
        ]
    if arch.qkv_bias:
        out.append(ParamMap(m + "self_attention.linear_qkv.bias",
                            (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"), "qkv", layer))
    if arch.qk_norm:
        out += [ParamMap(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), "replicated", layer),
                ParamMap(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), "replicated", layer)]
    return out


def chunk_params(arch: Architecture, layers: range, pre_process: bool, post_process: bool,
                 te_spec: bool, ep_rank: int = 0, ep: int = 1) -> list[ParamMap]:
    """Every parameter of one model chunk holding global layers `layers` (local indices from 0), with the
    experts of expert-parallel rank `ep_rank` of `ep`."""
    out = []
    if pre_process:
        out.append(ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"))
    for local, layer in enumerate(layers):
        out += layer_params(arch, layer, local, te_spec, ep_rank, ep)
    if post_process:
        out.append(ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
        if not arch.tied_embeddings:
            out.append(ParamMap("output_layer.weight", ("lm_head.weight",), "vocab"))
        elif not pre_process:  # a last pipeline stage keeps its own copy of the tied embedding
            out.append(ParamMap("output_layer.weight", ("model.embed_tokens.weight",), "vocab"))
    return out


def chunk_layers(arch: Architecture, stage: int, stages: int, chunk: int = 0, chunks: int = 1) -> range:
    """Global layers of model chunk `chunk` of pipeline stage `stage`. The layers are cut into stages x chunks
    equal pieces, placed as megatron's interleaved schedule runs them: chunk 0 of every stage in stage order,
    then chunk 1, ... (with one chunk per stage, stage s holds the s-th consecutive block)."""
    per_piece = arch.num_layers // (stages * chunks)
    start = (chunk * stages + stage) * per_piece
    return range(start, start + per_piece)


def stage_params(arch: Architecture, stage: int, stages: int, te_spec: bool, chunk: int = 0,
                 chunks: int = 1, ep_rank: int = 0, ep: int = 1) -> list[ParamMap]:
    """Weight map of one model chunk of a pipeline stage: the embedding on the very first piece, the final
    norm and output layer on the very last."""
    return chunk_params(arch, chunk_layers(arch, stage, stages, chunk, chunks),
                        *model_ends(stage, stages, chunk, chunks), te_spec, ep_rank, ep)


def model_ends(stage: int, stages: int, chunk: int, chunks: int) -> tuple[bool, bool]:
    """(holds the embedding, holds the final norm and output layer) for a chunk of a pipeline stage."""
    return stage == 0 and chunk == 0, stage == stages - 1 and chunk == chunks - 1


def build_chunks(arch: Architecture, mc, layout, moe=None, routing_replay: bool = False
                 ) -> tuple[list, list[list[ParamMap]]]:
    """This rank's model chunks (one per virtual pipeline stage; a single one without interleaving, each
    holding its tensor-parallel slices and its experts) and their weight maps. `moe`: the router's training
    settings (MoEConfig; its defaults when None); `routing_replay`: routers that can replay given experts."""
    from ..config import MoEConfig
    from .model import build_gpt_model, transformer_engine_available

    te_spec = transformer_engine_available()
    models, params = [], []
    for chunk in range(layout.vp):
        first, last = model_ends(layout.pp_rank, layout.pp, chunk, layout.vp)
        models.append(build_gpt_model(arch, mc, pre_process=first, post_process=last,
                                      vp_stage=chunk if layout.vp > 1 else None, moe=moe or MoEConfig(),
                                      routing_replay=routing_replay))
        params.append(stage_params(arch, layout.pp_rank, layout.pp, te_spec, chunk, layout.vp, layout.ep_rank,
                                   layout.ep))
    return models, params


def hf_names(arch: Architecture) -> list[str]:
    """Every tensor name of the HF checkpoint, in the order exports write them."""
    params = chunk_params(arch, range(arch.num_layers), True, True, te_spec=False)
    return [name for p in params for name in p.hf]


def _qkv_groups(arch: Architecture, q, k, v):
    """[q; k; v] rows -> rows grouped per query group: [q_0, k_0, v_0, q_1, k_1, v_1, ...]."""
    g, d = arch.num_kv_heads, arch.head_dim
    rest = q.shape[1:]
    per_group = [q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def _qkv_ungroup(arch: Architecture, fused):
    g, d = arch.num_kv_heads, arch.head_dim
    q_rows = arch.num_heads // g * d
    grouped = fused.reshape(g, q_rows + 2 * d, *fused.shape[1:])
    q, k, v = grouped.split([q_rows, d, d], dim=1)
    return [t.reshape(-1, *fused.shape[1:]) for t in (q, k, v)]


def to_megatron(p: ParamMap, hf: list[torch.Tensor], arch: Architecture, rank: int, size: int,
                padded_vocab: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of parameter `p`, from its HF tensors (in `p.hf` order)."""
    if p.kind == "replicated":
        return hf[0]
    if p.kind == "row":
        return hf[0].chunk(size, dim=1)[rank]
    if p.kind == "qkv":
        return _qkv_groups(arch, *hf).chunk(size, dim=0)[rank]
    if p.kind == "gate_up":
        return torch.cat([t.chunk(size, dim=0)[rank] for t in hf], dim=0)
    if p.kind == "vocab":
        full = hf[0]
        padded = full.new_zeros(padded_vocab, *full.shape[1:])
        padded[: full.shape[0]] = full
        return padded.chunk(size, dim=0)[rank]
    raise ValueError(f"unknown parameter kind {p.kind!r}")


def to_hf(p: ParamMap, shards: list[torch.Tensor], arch: Architecture) -> list[torch.Tensor]:
    """The HF tensors of parameter `p` from the slices of every tensor-parallel rank (rank order)."""
    if p.kind == "replicated":
        return [shards[0]]
    if p.kind == "row":
        return [torch.cat(shards, dim=1)]
    if p.kind == "qkv":
        return _qkv_ungroup(arch, torch.cat(shards, dim=0))
    if p.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if p.kind == "vocab":
        return [torch.cat(shards, dim=0)[: arch.vocab_size]]
    raise ValueError(f"unknown parameter kind {p.kind!r}")


def iter_local(model, params: list[ParamMap]) -> Iterator[tuple[ParamMap, torch.Tensor]]:
    """(mapping, this rank's tensor) for every mapped parameter of a model chunk; refuses a mismatch."""
    own = dict(model.named_parameters())
    names = {p.megatron for p in params}
    unmapped = sorted(set(own) - names)
    missing = sorted(names - set(own))
    if unmapped or missing:
        raise RuntimeError(f"megatron model and weight map disagree: unmapped {unmapped[:4]}, missing {missing[:4]}")
    for p in params:
        yield p, own[p.megatron]


def mark_tensor_parallel(model, params: list[ParamMap]) -> None:
    """Set megatron's tensor-parallel attributes on split parameters. Its layers set them only while
    initialising weights, which is skipped here (weights come from a checkpoint), and grad-norm and
    optimizer code reads them to count every slice once and replicated weights once."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    own = dict(model.named_parameters())
    for p in params:
        if p.kind != "replicated" and not hasattr(own[p.megatron], "tensor_model_parallel"):  # biases have them
            set_tensor_model_parallel_attributes(own[p.megatron], True, 1 if p.kind == "row" else 0, 1)
