"""A megatron-core GPTModel whose architecture is read from an HF checkpoint's `config.json`.

Supported families (decoders with RMSNorm, SwiGLU and RoPE): Llama, Mistral, Qwen2, Qwen3 (q/k RMSNorm),
and Qwen3-MoE (Qwen3 whose every MLP is a mixture of experts: a softmax router picks top-k of E SwiGLU
experts, no shared expert). Layer spec: Transformer Engine's when TE imports and a GPU is present (FP8 from
config), otherwise megatron-core's local spec with a torch-SDPA core attention; experts are megatron's
SequentialMLP (one GEMM per expert; grouped GEMM needs a GPU) behind the alltoall token dispatcher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import MegatronConfig, MoEConfig
from ..errors import SoupError

SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


class UnsupportedModel(SoupError, ValueError):
    """An HF architecture or setting this backend cannot build."""


@dataclass(frozen=True)
class Architecture:
    """What the HF config says, in the terms the Megatron model and the weight mapping need."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tied_embeddings: bool
    max_positions: int
    rope_theta: float
    rope_scaling: dict | None
    num_experts: int = 0  # 0: a dense model
    moe_top_k: int = 0  # experts per token
    moe_ffn_hidden_size: int = 0  # one expert's intermediate size
    moe_norm_topk: bool = False  # the top-k probabilities renormalised to sum to 1 (HF norm_topk_prob)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_hf(cls, hf_config) -> "Architecture":
        family = hf_config.model_type
        if family not in SUPPORTED:
            raise UnsupportedModel(f"model_type {family!r} ({getattr(hf_config, 'architectures', None)}) is not "
                                   f"supported by the megatron backend; supported: {', '.join(SUPPORTED.values())}")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {hf_config.hidden_act!r}: only silu (SwiGLU) is supported")
        if family == "mistral" and getattr(hf_config, "sliding_window", None):
            if hf_config.sliding_window < hf_config.max_position_embeddings:
                raise UnsupportedModel(f"mistral sliding_window={hf_config.sliding_window} is not supported "
                                       "(only full attention)")
        if family == "qwen3_moe" and (getattr(hf_config, "decoder_sparse_step", 1) != 1
                                      or getattr(hf_config, "mlp_only_layers", None)):
            raise UnsupportedModel(f"qwen3_moe with decoder_sparse_step={hf_config.decoder_sparse_step} and "
                                   f"mlp_only_layers={hf_config.mlp_only_layers}: only models whose every layer is "
                                   "a mixture of experts are supported (decoder_sparse_step=1, no mlp_only_layers)")
        moe = {}
        if family == "qwen3_moe":
            moe = dict(num_experts=hf_config.num_experts, moe_top_k=hf_config.num_experts_per_tok,
                       moe_ffn_hidden_size=hf_config.moe_intermediate_size,
                       moe_norm_topk=bool(hf_config.norm_topk_prob))
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(hf_config, "rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            family=family,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
            ffn_hidden_size=hf_config.intermediate_size,
            norm_eps=hf_config.rms_norm_eps,
            qkv_bias=family == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            max_positions=hf_config.max_position_embeddings,
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
            **moe,
        )


def read_architecture(path: Path) -> Architecture:
    """The architecture of an HF checkpoint, from its directory or from its config.json alone (what the
    planners are given), read by transformers' AutoConfig: every default is the one the checkpoint loads with."""
    from transformers import AutoConfig

    from ..model.hf import CheckpointError

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (an HF checkpoint directory or its config.json is expected)")
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (an HF checkpoint directory is expected)")
    try:
        hf_config = AutoConfig.from_pretrained(config_file)
    except (OSError, ValueError) as exc:  # not JSON; no or an unknown model_type
        raise CheckpointError(f"{config_file}: not an HF model config: {str(exc).splitlines()[0]}") from None
    try:
        return Architecture.from_hf(hf_config)
    except UnsupportedModel as exc:
        raise UnsupportedModel(f"{config_file}: {exc}") from None


def padded_vocab_size(vocab_size: int, cfg: MegatronConfig) -> int:
    """Megatron pads the embedding so every tensor-parallel rank holds an equal, aligned slice."""
    multiple = cfg.make_vocab_size_divisible_by * cfg.tensor_parallel
    return math.ceil(vocab_size / multiple) * multiple


def rope_arguments(arch: Architecture) -> dict:
    """GPTModel's RoPE arguments for the HF `rope_parameters`; scalings megatron-core lacks are refused."""
    scaling = arch.rope_scaling
    if scaling is None:
        return {}
    kind = scaling["rope_type"]
    if kind == "linear":
        return {"seq_len_interpolation_factor": float(scaling["factor"])}
    if kind == "llama3":
        # megatron-core's llama3 scaling fixes low/high frequency factors 1 and 4 and an 8192 context
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if any(float(scaling.get(k, v)) != v for k, v in fixed.items()):
            raise UnsupportedModel(f"llama3 rope scaling {scaling}: megatron-core supports only {fixed}")
        return {"rope_scaling": True, "rope_scaling_factor": float(scaling["factor"])}
    raise UnsupportedModel(f"rope_type {kind!r} is not supported (default, linear and llama3 are)")


def check_parallel_sizes(arch: Architecture, cfg: MegatronConfig) -> None:
    """Refuse sizes that do not divide the model, with the arithmetic."""
    tp, pp, vp = cfg.tensor_parallel, cfg.pipeline_parallel, cfg.virtual_pipeline
    for what, count in (("num_attention_heads", arch.num_heads), ("num_key_value_heads", arch.num_kv_heads),
                        ("intermediate_size", arch.ffn_hidden_size)):
        if count % tp:
            raise UnsupportedModel(f"actor.megatron.tensor_parallel={tp} does not divide the model's {what}={count} "
                                   f"({count} / {tp} = {count / tp:.2f})")
    ep = cfg.expert_parallel
    if ep > 1 and not arch.is_moe:
        raise UnsupportedModel(f"actor.megatron.expert_parallel={ep} needs a mixture-of-experts model; "
                               f"{arch.family} is dense (set expert_parallel=1)")
    if arch.is_moe and arch.num_experts % ep:
        raise UnsupportedModel(f"actor.megatron.expert_parallel={ep} does not divide the model's num_experts="
                               f"{arch.num_experts} ({arch.num_experts} / {ep} = {arch.num_experts / ep:.2f})")
    if arch.is_moe and tp > 1 and not cfg.sequence_parallel:
        raise UnsupportedModel(f"actor.megatron.tensor_parallel={tp} with a mixture-of-experts model needs "
                               "actor.megatron.sequence_parallel=true (megatron-core requires it for MoE layers)")
    if arch.is_moe and arch.moe_ffn_hidden_size % tp:
        raise UnsupportedModel(f"actor.megatron.tensor_parallel={tp} does not divide the model's "
                               f"moe_intermediate_size={arch.moe_ffn_hidden_size} (experts are split like the MLP)")
    if arch.num_layers % (pp * vp):
        raise UnsupportedModel(f"pipeline_parallel={pp} x virtual_pipeline={vp} = {pp * vp} does not divide "
                               f"num_hidden_layers={arch.num_layers}")
    if vp > 1 and pp == 1:
        raise UnsupportedModel("actor.megatron.virtual_pipeline > 1 needs pipeline_parallel > 1")


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # TE raises RuntimeError/OSError when its CUDA libraries are missing
        return False
    return True


def moe_arguments(arch: Architecture, cfg: MegatronConfig, moe: MoEConfig, routing_replay: bool = False) -> dict:
    """TransformerConfig's mixture-of-experts arguments ({} for a dense model). HF's router takes the softmax
    over all experts, then the top-k, renormalised with norm_topk_prob; megatron's `pre_softmax=False` takes
    the softmax over the top-k logits, which is the renormalised top-k, and `pre_softmax=True` is the other."""
    if not arch.is_moe:
        return {}
    balancing = "aux_loss" if moe.aux_loss_coef > 0 else "none"
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_top_k,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_pre_softmax=not arch.moe_norm_topk,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=moe.aux_loss_coef,
        moe_z_loss_coeff=moe.z_loss_coef or None,
        moe_router_dtype={"float32": "fp32", "float64": "fp64", "params": None}[moe.router_dtype],
        expert_model_parallel_size=cfg.expert_parallel,
        moe_grouped_gemm=False,  # one GEMM per expert (SequentialMLP): grouped GEMM kernels need a GPU
        moe_permute_fusion=False,
        moe_enable_routing_replay=routing_replay,  # each router gets a RouterReplay (mcore/routing_replay.py)
    )


def transformer_config(arch: Architecture, cfg: MegatronConfig, use_te: bool, moe: MoEConfig = MoEConfig(),
                       routing_replay: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    if cfg.fp8 and not use_te:
        missing = "no GPU is present" if not torch.cuda.is_available() else "transformer_engine does not import"
        raise UnsupportedModel(f"actor.megatron.fp8={cfg.fp8!r} needs Transformer Engine on a GPU, and {missing}; "
                               f"set actor.megatron.fp8='' to train in {cfg.params_dtype}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.params_dtype]
    fp8 = {"fp8": cfg.fp8, "fp8_recipe": cfg.fp8_recipe} if cfg.fp8 else {}
    recompute = {}
    if cfg.recompute == "selective":
        recompute = {"recompute_granularity": "selective"}
    elif cfg.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline if cfg.virtual_pipeline > 1 else None,
        context_parallel_size=cfg.context_parallel,
        sequence_parallel=cfg.sequence_parallel and cfg.tensor_parallel > 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        calculate_per_token_loss=True,  # the SOUP loss carries global token weights: gradients are summed, not averaged
        variable_seq_lengths=True,  # microbatches keep their own padded width; stages exchange shapes first
        moe_token_dispatcher_type="alltoall",  # the default (allgather) is refused with variable lengths; dense: unused
        batch_p2p_comm=on_gpu,  # the batched path synchronises CUDA; gloo takes plain isend / irecv
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,  # weights come from a checkpoint
        # fused kernels exist only on GPU
        bias_activation_fusion=False,
        masked_softmax_fusion=on_gpu,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **fp8,
        **recompute,
        **moe_arguments(arch, cfg, moe, routing_replay),
    )


class TorchRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm built from megatron's module arguments, allowed under sequence parallelism (megatron's
    WrappedTorchNorm refuses it). There each tensor-parallel rank normalises its share of the sequence, so
    the weight's gradient is partial: its `sequence_parallel` mark makes finalize_model_grads sum it over the
    tensor-parallel group."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def local_layer_spec(arch: Architecture):
    """The layer of the local (no Transformer Engine) backend, a ModuleSpec of its own: megatron's parallel
    linear layers, SDPA core attention (megatron's local one uses a CUDA buffer) and torch norms; for a
    mixture-of-experts model a MoELayer of SequentialMLP experts in place of the MLP."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from .sdpa_attention import SDPACoreAttention

    qk = TorchRMSNorm if arch.qk_norm else IdentityOp
    attention = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                           submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                              core_attention=SDPACoreAttention,
                                                              linear_proj=RowParallelLinear,
                                                              q_layernorm=qk, k_layernorm=qk))
    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    # checkpoint keys as the Transformer Engine layer names them (its norms are fused into the linears; a
    # MoE layer's pre-MLP norm stays a module of its own there too)
    keys = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if arch.is_moe:
        mlp = ModuleSpec(module=MoELayer, submodules=MoESubmodules(
            experts=ModuleSpec(module=SequentialMLP, submodules=linears), shared_experts=None))
    else:
        mlp = ModuleSpec(module=MLP, submodules=linears)
        keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=TorchRMSNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=TorchRMSNorm, mlp=mlp, mlp_bda=get_bias_dropout_add, sharded_state_dict_keys_map=keys))


def layer_spec(arch: Architecture, cfg: MegatronConfig, use_te: bool):
    """Transformer Engine's layer spec, or the local one (the block spec of one model chunk's layers)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts or None, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm)
    chunk_layers = arch.num_layers // (cfg.pipeline_parallel * cfg.virtual_pipeline)
    return TransformerBlockSubmodules(layer_specs=[local_layer_spec(arch)] * chunk_layers,
                                      layer_norm=TorchRMSNorm)


def build_gpt_model(arch: Architecture, cfg: MegatronConfig, pre_process: bool = True, post_process: bool = True,
                    vp_stage: int | None = None, moe: MoEConfig = MoEConfig(), routing_replay: bool = False):
    """One model chunk of this rank (its pipeline stage, its tensor-parallel slices)."""
    from megatron.core.models.gpt import GPTModel

    from . import cpu_compat

    cpu_compat.enable()
    check_parallel_sizes(arch, cfg)
    use_te = transformer_engine_available()
    with cpu_compat.cuda_on_cpu():  # a tied last stage moves its embedding copy with `.cuda()`
        model = GPTModel(
            config=transformer_config(arch, cfg, use_te, moe, routing_replay),
            transformer_layer_spec=layer_spec(arch, cfg, use_te),
            vocab_size=padded_vocab_size(arch.vocab_size, cfg),
            max_sequence_length=arch.max_positions,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,  # logits stay split along the vocabulary
            share_embeddings_and_output_weights=arch.tied_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            vp_stage=vp_stage,
            **rope_arguments(arch),
        )
    if cfg.params_dtype == "bfloat16":
        # the local spec builds its norms in fp32; megatron's optimizer checkpoints only the bf16 parameters it
        # keeps fp32 main copies of, so every parameter is bf16 (as megatron's Float16Module casts them)
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
