"""Per-GPU memory of a training plan, computed before any GPU is booked; a plan that does not fit is refused.

Parameters: counted exactly from the HF config.json, in megatron-core's layout (soup_megatron/mcore/model.py)
    V_pad = ceil(V / (div * t)) * div * t       div = actor.megatron.make_vocab_size_divisible_by, t = TP size
    embedding V_pad * h; output layer V_pad * h (none when tied; with pp > 1 a tied one is a copy on the last stage)
    per layer: qkv h * (n_q + 2 n_kv) * d_head (+ (n_q + 2 n_kv) * d_head bias: Qwen2), o-proj n_q * d_head * h,
               SwiGLU MLP 3 * h * ffn, two RMSNorms 2h (+ q/k RMSNorms 2 d_head: Qwen3); final RMSNorm h
    per GPU: layers / pp of them with their matrices split over t (norms replicated); the embedding on the first
    stage, the output layer and final norm on the last (pp = 1: all on one GPU).
    Mixture of experts (Qwen3-MoE): a layer's MLP is E experts of 3 * h * ffn_e each, split over e = expert-
    parallel ranks and then over t, and a router E * h replicated; a token uses k of them, so the active
    parameters (compute per token) count k / E of the experts, the total (weights to hold and sync) all E.

Weights, gradients and optimizer state, bytes per parameter: the actor's megatron-core DDP (fp32 gradient
buffers) and optimizer, Megatron-LM docs, "Distributed Optimizer": bf16 params + fp32 grads 6 + 12/d
(2 + 4 + (4 main weights + 8 Adam m, v) / d); fp32 params + fp32 grads 8 + 8/d; d = data x context-parallel
size with actor.megatron.distributed_optimizer (megatron shards over both), 1 without (18 and 16). Expert
parameters are replicated over fewer ranks, d / e (megatron's expert data-parallel group), and shard over those.
With routing replay the driver also holds each step's routed experts, (T - 1) x layers x k int16 per sample,
on the host (reported, not counted against the GPU).

Activations per transformer layer and microbatch: Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models" (arXiv:2205.05198), Table 2; bytes for 16-bit activations (twice that for float32),
s = sequence length / context parallel, b = micro batch, h = hidden, a = attention heads, t = TP size:
    no recompute, TP           s b h (10 + 24/t + 5 a s / (h t))
    no recompute, TP + SP      s b h (34/t + 5 a s / (h t))
    selective, TP              s b h (10 + 24/t)              (attention scores recomputed)
    selective, TP + SP         s b h (34/t)
    full                       2 s b h (the layer input), plus one layer without recompute while it is recomputed
The constants are the paper's, derived for GPT-3-style layers (multi-head attention, a 4h GELU MLP, dropout) and
kept as published, not re-derived for these models: a SwiGLU MLP with ffn >= 3.5h keeps more than the 4h MLP,
grouped-query attention keeps smaller K and V, and flash attention (Transformer Engine) never keeps the 5as/(ht)
scores. Read the activations as an estimate, not a measurement.
Pipeline (1F1B, megatron-core pipeline_parallel/schedules.py): stage r keeps pp - r microbatches in flight;
interleaved with vp chunks per stage (2 (pp - r - 1) + (vp - 1) pp + 1) / vp layer stacks, which is
pp (1 + (pp - 1) / (pp vp)) on the first stage (the paper's interleaving note). An upper bound when a step has
fewer microbatches than that.
Logits, last stage: s b V_pad / t values kept for the vocab-parallel log-softmax and their gradient, both in the
parameter dtype (soup_megatron/mcore/logprobs.py recomputes the fp32 softmax chunk by chunk), plus about three
fp32 tensors of one chunk (actor.megatron.logprob_chunk positions): an estimate.
Plus a fixed 2 GiB for the CUDA context and the NCCL / cuBLAS workspaces.

SGLang, on the rollout GPUs (reported apart from the trainer; checked with rollout.backend=sglang):
    weights per GPU      N * q / tp_sglang          q = 4 for rollout.sglang.dtype=float32, else 2
    KV bytes per token   2 * layers * n_kv * d_head * q / min(tp_sglang, n_kv)
    KV pool              mem_fraction_static * GPU memory - weights per GPU   (0.85 assumed when unset)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..config import Config, MegatronConfig, load_config
from ..errors import SoupError, refusals_to_exit_code
from ..log import get_logger
from ..mcore.model import Architecture, UnsupportedModel, check_parallel_sizes, padded_vocab_size, read_architecture

log = get_logger(__name__)

GIB = 2**30
PROMPT_BUDGET = 1024  # tokens of prompt assumed in a training sample unless --seq-len says otherwise
CUDA_CONTEXT_BYTES = 2 * GIB
ASSUMED_MEM_FRACTION = 0.85  # SGLang's usual mem_fraction_static on an 80 GB GPU
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ADVICE = {
    "weights": "split the model further (actor.megatron.tensor_parallel, actor.megatron.pipeline_parallel) "
               "or train in actor.megatron.params_dtype=bfloat16",
    "activations": "recompute (actor.megatron.recompute=selective or full), lower actor.micro_batch_size, "
                   "turn on actor.megatron.sequence_parallel or split the sequence (actor.megatron.context_parallel)",
    "logits": "lower actor.micro_batch_size or raise actor.megatron.tensor_parallel (the vocabulary is split over it)",
    "CUDA context": "a GPU with more memory",
}
ADVICE["gradients"] = ADVICE["weights"]
ADVICE["optimizer state"] = (ADVICE["weights"] + ", or shard the optimizer state over data-parallel ranks "
                             "(actor.megatron.distributed_optimizer=true with a larger --world-size)")


class PlanError(SoupError, ValueError):
    """A plan that cannot be computed or does not fit."""


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a model, grouped by where megatron-core puts them."""

    embedding: int
    output: int  # 0 when the output layer is the tied embedding
    layer_split: int  # one layer's matrices and qkv bias, split over tensor-parallel ranks
    layer_replicated: int  # one layer's RMSNorm weights, whole on every tensor-parallel rank
    final_norm: int
    num_layers: int
    layer_experts: int = 0  # one MoE layer's experts, all E of them, split over expert-parallel then TP ranks
    experts_used: float = 0.0  # the share of them a token uses, k / E

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.num_layers * (self.layer_split + self.layer_replicated
                                                                 + self.layer_experts) + self.final_norm

    @property
    def active(self) -> int:
        """Parameters one token computes with (all of a dense model)."""
        return self.total - round(self.num_layers * self.layer_experts * (1 - self.experts_used))

    def experts_on_stage(self, tp: int, pp: int, ep: int) -> int:
        """Expert parameters on one GPU of any pipeline stage."""
        return self.num_layers // pp * self.layer_experts // (tp * ep)

    def on_stage(self, stage: int, tp: int, pp: int, ep: int = 1) -> int:
        """Parameters on one GPU of pipeline stage `stage` (0 = first), its experts included."""
        count = self.num_layers // pp * (self.layer_split // tp + self.layer_replicated)
        count += self.experts_on_stage(tp, pp, ep)
        if stage == 0:
            count += self.embedding // tp
        if stage == pp - 1:
            output = self.output or (self.embedding if pp > 1 else 0)
            count += output // tp + self.final_norm
        return count


def parameter_counts(arch: Architecture, padded_vocab: int) -> ParameterCounts:
    h, d = arch.hidden_size, arch.head_dim
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) * d
    mlp = 0 if arch.is_moe else 3 * h * arch.ffn_hidden_size
    return ParameterCounts(
        embedding=padded_vocab * h,
        output=0 if arch.tied_embeddings else padded_vocab * h,
        layer_split=h * qkv + (qkv if arch.qkv_bias else 0) + arch.num_heads * d * h + mlp,
        layer_replicated=2 * h + (2 * d if arch.qk_norm else 0) + arch.num_experts * h,  # norms, the router
        final_norm=h,
        num_layers=arch.num_layers,
        layer_experts=arch.num_experts * 3 * h * arch.moe_ffn_hidden_size,
        experts_used=arch.moe_top_k / arch.num_experts if arch.is_moe else 0.0,
    )


def bytes_per_parameter(distributed: bool, params_dtype: str, optimizer_shards: int) -> dict[str, float]:
    """Bytes per parameter on one GPU for weights, gradients and optimizer state."""
    shards = optimizer_shards if distributed else 1
    if params_dtype == "bfloat16":  # fp32 gradient buffer; fp32 main weights and Adam m, v (sharded over d)
        return {"weights": 2, "gradients": 4, "optimizer state": (4 + 8) / shards}
    return {"weights": 4, "gradients": 4, "optimizer state": 8 / shards}


def layer_activation_bytes(seq: float, micro_batch: int, hidden: int, heads: int, tp: int, sequence_parallel: bool,
                           recompute: str, params_dtype: str) -> float:
    """Activations one transformer layer keeps for the backward pass, one microbatch (Table 2 of the paper)."""
    scale = DTYPE_BYTES[params_dtype] / 2
    if recompute == "full":
        return 2 * seq * micro_batch * hidden * scale
    per_sbh = 34 / tp if sequence_parallel else 10 + 24 / tp
    if recompute == "none":
        per_sbh += 5 * heads * seq / (hidden * tp)
    return seq * micro_batch * hidden * per_sbh * scale


def microbatches_in_flight(stage: int, pp: int, vp: int) -> float:
    """Microbatches whose activations pipeline stage `stage` keeps at once under 1F1B, in whole layer stacks."""
    if vp == 1:
        return pp - stage
    return (2 * (pp - stage - 1) + (vp - 1) * pp + 1) / vp


def logits_bytes(seq: float, micro_batch: int, padded_vocab: int, tp: int, params_dtype: str, chunk: int) -> float:
    """Logits kept for the log-softmax and their gradient, plus one chunk's fp32 softmax work (an estimate)."""
    local = seq * micro_batch * padded_vocab / tp
    return 2 * local * DTYPE_BYTES[params_dtype] + 3 * 4 * local * min(chunk, seq) / seq


@dataclass(frozen=True)
class Plan:
    arch: Architecture
    megatron: MegatronConfig
    micro_batch: int
    seq_len: int
    world_size: int

    @property
    def model_parallel(self) -> int:
        return self.megatron.tensor_parallel * self.megatron.pipeline_parallel * self.megatron.context_parallel

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.model_parallel

    @property
    def optimizer_shards(self) -> int:
        """Ranks the distributed optimizer shards its state over: data x context parallel."""
        return self.data_parallel * self.megatron.context_parallel

    @property
    def expert_optimizer_shards(self) -> int:
        """Ranks holding the same experts (megatron's expert data-parallel group), over which their optimizer
        state shards."""
        return self.optimizer_shards // self.megatron.expert_parallel

    @property
    def padded_vocab(self) -> int:
        return padded_vocab_size(self.arch.vocab_size, self.megatron)

    @property
    def counts(self) -> ParameterCounts:
        """As megatron holds them: the vocabulary padded."""
        return parameter_counts(self.arch, self.padded_vocab)

    @property
    def model_parameters(self) -> int:
        """As the HF checkpoint holds them."""
        return parameter_counts(self.arch, self.arch.vocab_size).total

    def stage_bytes(self, stage: int) -> dict[str, float]:
        """Memory terms of one GPU of pipeline stage `stage`, in bytes."""
        mc = self.megatron
        tp, pp = mc.tensor_parallel, mc.pipeline_parallel
        seq = self.seq_len / mc.context_parallel
        params = self.counts.on_stage(stage, tp, pp, mc.expert_parallel)
        experts = self.counts.experts_on_stage(tp, pp, mc.expert_parallel)
        per_parameter = bytes_per_parameter(mc.distributed_optimizer, mc.params_dtype, self.optimizer_shards)
        per_expert = bytes_per_parameter(mc.distributed_optimizer, mc.params_dtype, self.expert_optimizer_shards)
        terms = {name: (params - experts) * size + experts * per_expert[name] for name, size in per_parameter.items()}
        layer = (seq, self.micro_batch, self.arch.hidden_size, self.arch.num_heads, tp,
                 mc.sequence_parallel and tp > 1)
        stacks = self.arch.num_layers // pp * microbatches_in_flight(stage, pp, mc.virtual_pipeline)
        terms["activations"] = stacks * layer_activation_bytes(*layer, mc.recompute, mc.params_dtype)
        if mc.recompute == "full":
            terms["activations"] += layer_activation_bytes(*layer, "none", mc.params_dtype)
        terms["logits"] = logits_bytes(seq, self.micro_batch, self.padded_vocab, tp, mc.params_dtype,
                                       mc.logprob_chunk) if stage == pp - 1 else 0.0
        terms["CUDA context"] = CUDA_CONTEXT_BYTES
        return terms


@dataclass(frozen=True)
class SGLangBudget:
    bytes_per_value: int  # of weights and KV cache
    weights: float  # bytes per GPU
    kv_per_token: float  # bytes per GPU
    static: float  # mem_fraction_static * GPU memory

    @property
    def kv_pool(self) -> float:
        return self.static - self.weights

    @property
    def tokens(self) -> int:
        return max(0, int(self.kv_pool // self.kv_per_token))


def sglang_budget(arch: Architecture, total_params: int, tp: int, dtype: str, mem_fraction: float,
                  gpu_bytes: float) -> SGLangBudget:
    q = 4 if dtype in ("float32", "float") else 2  # "auto" serves a bf16 checkpoint in bf16
    kv_heads_per_gpu = arch.num_kv_heads / min(tp, arch.num_kv_heads)
    return SGLangBudget(bytes_per_value=q, weights=total_params * q / tp,
                        kv_per_token=2 * arch.num_layers * kv_heads_per_gpu * arch.head_dim * q,
                        static=mem_fraction * gpu_bytes)


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def trainer_table(plan: Plan, stages: dict[str, int], gpu_bytes: float) -> Table:
    """Memory terms of the first and last pipeline stages (one column when pp = 1)."""
    mc, arch = plan.megatron, plan.arch
    per_param = bytes_per_parameter(mc.distributed_optimizer, mc.params_dtype, plan.optimizer_shards)
    layers = arch.num_layers // mc.pipeline_parallel
    sp = "SP" if mc.sequence_parallel and mc.tensor_parallel > 1 else "no SP"
    how = {
        "weights": f"{per_param['weights']:g} B/param",
        "gradients": f"{per_param['gradients']:g} B/param",
        "optimizer state": f"{per_param['optimizer state']:g} B/param (Adam"
                           + (", fp32 main weights" if mc.params_dtype == "bfloat16" else "")
                           + (f", / d={plan.optimizer_shards}" if mc.distributed_optimizer else "")
                           + (f"; experts / {plan.expert_optimizer_shards}" if plan.arch.is_moe
                              and mc.distributed_optimizer else "") + ")",
        "activations": f"recompute={mc.recompute}, {sp}: {layers} layers x microbatches in flight",
        "logits": f"s b V_pad/t, V_pad={plan.padded_vocab}, last stage",
        "CUDA context": "fixed allowance",
    }
    table = Table(title="trainer, per GPU", title_justify="left")
    table.add_column("term")
    table.add_column("how")
    for name in stages:
        table.add_column(name, justify="right")
    tp, pp = mc.tensor_parallel, mc.pipeline_parallel
    ep = mc.expert_parallel
    table.add_row("parameters", "exact count" + (f", experts over ep={ep}" if arch.is_moe else ""),
                  *(f"{plan.counts.on_stage(s, tp, pp, ep) / 1e9:.3f} B" for s in stages.values()))
    table.add_row("microbatches in flight", "1F1B schedule",
                  *(f"{microbatches_in_flight(s, pp, mc.virtual_pipeline):g}" for s in stages.values()))
    terms = [plan.stage_bytes(s) for s in stages.values()]
    for term in how:
        table.add_row(term, how[term], *(gib(t[term]) for t in terms))
    totals = [sum(t.values()) for t in terms]
    table.add_row("total", f"of {gib(gpu_bytes)}",
                  *(f"[{'red' if t > gpu_bytes else 'green'}]{gib(t)}[/]" for t in totals))
    return table


def sglang_table(budget: SGLangBudget, cfg: Config, mem_fraction: float, seq_len: int, servers: str = "") -> Table:
    sg = cfg.rollout.sglang
    table = Table(title=f"SGLang{servers}, per rollout GPU: tp={sg.tp_size}, dtype={sg.dtype}, "
                        f"mem_fraction_static={mem_fraction:g}", title_justify="left")
    table.add_column("term")
    table.add_column("value", justify="right")
    allocated = min(budget.tokens, sg.max_total_tokens)
    for name, value in [("weights", gib(budget.weights)),
                        ("static memory (weights + KV pool)", gib(budget.static)),
                        ("KV pool", gib(budget.kv_pool)),
                        ("KV cache per token", f"{budget.kv_per_token / 2**10:.0f} KiB"),
                        ("tokens that fit", f"{budget.tokens:,}"),
                        ("tokens allocated (rollout.sglang.max_total_tokens caps)", f"{allocated:,}"),
                        (f"sequences of {seq_len} tokens at once", f"{allocated // seq_len:,}")]:
        table.add_row(name, value)
    return table


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="plan_memory.py", description=__doc__.splitlines()[0],
                                     epilog="formulas and their sources: soup_megatron/planning/memory.py")
    parser.add_argument("--config", required=True, help="run configuration (YAML)")
    parser.add_argument("--architecture", type=Path,
                        help="HF config.json of the model (default: <model.path>/config.json)")
    parser.add_argument("--seq-len", type=positive_int,
                        help=f"tokens of one training sample (default: prompt budget {PROMPT_BUDGET} + "
                             "rollout.max_response_len)")
    parser.add_argument("--world-size", type=positive_int,
                        help="GPUs training (default: tensor x pipeline x context parallel, i.e. data parallel 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. actor.megatron.tensor_parallel=8")
    return parser.parse_intermixed_args(argv)


def plan_from(args, cfg: Config) -> Plan:
    mc = cfg.actor.megatron
    arch = read_architecture(args.architecture or Path(cfg.model.path) / "config.json")
    try:
        check_parallel_sizes(arch, mc)
    except UnsupportedModel as exc:
        raise PlanError(str(exc)) from None
    plan = Plan(arch=arch, megatron=mc, micro_batch=cfg.actor.micro_batch_size,
                seq_len=args.seq_len or PROMPT_BUDGET + cfg.rollout.max_response_len,
                world_size=args.world_size or mc.tensor_parallel * mc.pipeline_parallel * mc.context_parallel,
)
    world, model_parallel = plan.world_size, plan.model_parallel
    if world % model_parallel:
        raise PlanError(f"--world-size {world} is not a multiple of tensor_parallel {mc.tensor_parallel} x "
                        f"pipeline_parallel {mc.pipeline_parallel} x context_parallel {mc.context_parallel} = "
                        f"{model_parallel} ({world} / {model_parallel} = {world / model_parallel:.2f})")
    if plan.optimizer_shards % mc.expert_parallel:
        raise PlanError(f"actor.megatron.expert_parallel={mc.expert_parallel} does not divide the "
                        f"{plan.optimizer_shards} data x context-parallel ranks of --world-size {world}")
    return plan


def notes(args, cfg: Config, plan: Plan) -> list[str]:
    sg = cfg.rollout.sglang
    out = []
    if args.seq_len is None:
        out.append(f"s = {plan.seq_len}: prompt budget {PROMPT_BUDGET} + rollout.max_response_len "
                   f"{cfg.rollout.max_response_len} (--seq-len to change)")
    out.append("activations use the published constants of Korthikanti et al. 2022 (GPT-3-style layers): "
               "an estimate for SwiGLU / grouped-query models")
    if sg.mem_fraction_static is None:
        out.append(f"rollout.sglang.mem_fraction_static unset: assumed {ASSUMED_MEM_FRACTION} (SGLang's usual value)")
    if cfg.rollout.backend != "sglang":
        out.append(f"rollout.backend={cfg.rollout.backend}: SGLang is not started; its budget is not checked")
    if plan.arch.is_moe:
        out.append("activations of a MoE layer are taken as a dense layer's (its k experts' intermediate "
                   f"{plan.arch.moe_top_k} x {plan.arch.moe_ffn_hidden_size} against the 4h of the constants)")
    if plan.arch.is_moe and cfg.actor.routing_replay != "none":
        samples = cfg.rollout.prompts_per_step * cfg.rollout.group_size
        buffer = samples * plan.seq_len * plan.arch.num_layers * plan.arch.moe_top_k * 2
        out.append(f"routing replay: the driver holds {gib(buffer)} of routed experts a step on the host ({samples} "
                   f"samples x {plan.seq_len} positions x {plan.arch.num_layers} layers x top-{plan.arch.moe_top_k}, "
                   "int16), and sends each rank its micro-batches' share")
    return out


def refusals(args, cfg: Config, plan: Plan, stages: dict[str, int], budgets: dict[str, SGLangBudget]) -> list[str]:
    """Why the plan does not fit: the trainer's fullest GPU, then SGLang's (with rollout.backend=sglang)."""
    out = []
    name, terms = max(((name, plan.stage_bytes(stage)) for name, stage in stages.items()),
                      key=lambda item: sum(item[1].values()))
    total = sum(terms.values())
    if total > args.gpu_memory_gib * GIB:
        biggest = max(terms, key=terms.get)
        where = f" on the {name}" if plan.megatron.pipeline_parallel > 1 else ""
        out.append(f"the trainer needs {gib(total)} per GPU{where}, more than --gpu-memory-gib "
                   f"{args.gpu_memory_gib:g}; the biggest term is {biggest} ({gib(terms[biggest])}): "
                   f"{ADVICE[biggest]}")
    sg = cfg.rollout.sglang
    for servers, budget in budgets.items() if cfg.rollout.backend == "sglang" else ():
        fraction = "history_mem_fraction_static" if servers.startswith(" history") else "mem_fraction_static"
        if budget.kv_pool <= 0:
            out.append(f"SGLang{servers}: weights ({gib(budget.weights)} per GPU at rollout.sglang.tp_size="
                       f"{sg.tp_size}, dtype={sg.dtype}) exceed {fraction} x GPU memory = {gib(budget.static)}: "
                       f"raise rollout.sglang.tp_size or rollout.sglang.{fraction}"
                       + (" or serve in bfloat16" if budget.bytes_per_value == 4 else ""))
        elif budget.tokens < plan.seq_len:
            out.append(f"SGLang{servers}: the KV pool holds {budget.tokens} tokens, less than one sequence of "
                       f"{plan.seq_len}: raise rollout.sglang.tp_size or rollout.sglang.{fraction}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    return refusals_to_exit_code(lambda: _plan(args))


def _plan(args) -> int:
    cfg = load_config(args.config, args.overrides)
    plan = plan_from(args, cfg)
    mc, sg = plan.megatron, cfg.rollout.sglang
    gpu_bytes = args.gpu_memory_gib * GIB
    last = mc.pipeline_parallel - 1
    stages = {"GPU": 0} if last == 0 else {"first stage": 0, "last stage": last}
    mem_fraction = sg.mem_fraction_static if sg.mem_fraction_static is not None else ASSUMED_MEM_FRACTION
    fractions = {"": mem_fraction}
    if sg.history_mem_fraction_static is not None:  # its own share: colocated beside a policy server
        where = ", beside the policy servers" if cfg.soup.history_placement == "colocated" else ""
        fractions = {" policy servers": mem_fraction, f" history servers{where}": sg.history_mem_fraction_static}
    budgets = {servers: sglang_budget(plan.arch, plan.model_parameters, sg.tp_size, sg.dtype, fraction, gpu_bytes)
               for servers, fraction in fractions.items()}

    console = Console(width=160)
    active = (f" ({parameter_counts(plan.arch, plan.arch.vocab_size).active / 1e9:.2f} B active: top-"
              f"{plan.arch.moe_top_k} of {plan.arch.num_experts} experts)" if plan.arch.is_moe else "")
    console.print(f"{plan.arch.family}, {plan.model_parameters / 1e9:.2f} B parameters{active}; "
                  f"tp={mc.tensor_parallel} pp={mc.pipeline_parallel} vp={mc.virtual_pipeline} "
                  f"cp={mc.context_parallel} "
                  f"{f'ep={mc.expert_parallel} ' if plan.arch.is_moe else ''}"
                  f"d={plan.data_parallel} (world {plan.world_size}); s={plan.seq_len} b={plan.micro_batch}; "
                  f"{mc.params_dtype}; {'distributed' if mc.distributed_optimizer else 'replicated'} optimizer")
    console.print(trainer_table(plan, stages, gpu_bytes))
    for servers, fraction in fractions.items():
        console.print(sglang_table(budgets[servers], cfg, fraction, plan.seq_len, servers))
    for note in notes(args, cfg, plan):
        console.print(f"note: {note}")
    errors = refusals(args, cfg, plan, stages, budgets)
    for error in errors:
        log.error(f"error: {error}")
    return 2 if errors else 0
