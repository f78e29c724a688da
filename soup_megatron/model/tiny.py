"""The demo model, made locally with nothing downloaded: a character tokenizer built with `tokenizers`
and a ~1M-parameter Qwen2 (`transformers`; a Qwen3-MoE with model.tiny.num_experts), saved as an ordinary
HF checkpoint directory, then warm-started by a short SFT on a built-in task so the starting policy is weak
but not hopeless.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config, ConfigError
from ..data.arithmetic import parse_terms, worked_solution
from ..data.countdown import demonstration, parse_answer
from ..data.prompts import builtin_split
from ..io import atomic_dir
from .hf import pad_rows

EOS = "<|endoftext|>"


def build_tokenizer():
    """Byte-level tokenizer with no merges: every byte is one token (256 + EOS). It is the same
    pipeline as Qwen2's own tokenizer, so `AutoTokenizer` (and SGLang) load it back unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, **{ch: i + 1 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build_tiny_model(cfg: Config, vocab_size: int, eos_id: int):
    """A Qwen2 of model.tiny's shape, or with num_experts > 0 a Qwen3-MoE: every MLP num_experts SwiGLU
    experts of intermediate_size, top_k of them per token (renormalised), q/k norms, no shared expert."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    t = cfg.model.tiny
    shape = dict(vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                 num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                 intermediate_size=t.intermediate_size, max_position_embeddings=512, tie_word_embeddings=True,
                 bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(cfg.seed)
    if t.num_experts:
        # untied output layer, as Qwen3-MoE checkpoints have: SGLang's Qwen3-MoE ignores tie_word_embeddings
        # (a tied one is served with an empty output layer: uniform log-probs)
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **{**shape, "tie_word_embeddings": False}, head_dim=t.hidden_size // t.num_heads,
            num_experts=t.num_experts, num_experts_per_tok=t.top_k, moe_intermediate_size=t.intermediate_size,
            norm_topk_prob=True, router_aux_loss_coef=0.0))
    return Qwen2ForCausalLM(Qwen2Config(**shape))


def sft_batches(tokenizer, examples: list[tuple[str, str]], batch_size: int, steps: int, seed: int):
    """Right-padded (input_ids, labels) batches; labels mask the prompt so only the response is learned."""
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    encoded = []
    for prompt, solution in examples:
        p = tokenizer.encode(prompt)
        r = tokenizer.encode(solution) + [eos]
        encoded.append((p + r, [-100] * len(p) + r))
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        ids, _ = pad_rows([encoded[i][0] for i in idx], eos)
        labels, _ = pad_rows([encoded[i][1] for i in idx], -100)
        yield ids, labels


def demonstrations(cfg: Config) -> list[tuple[str, str]]:
    """(prompt, response) pairs of the task's training split for the warm start to imitate: its first
    `sft_examples` problems, or with sft_problems=unseen the ones after RL's first data.train_size (a split
    drawn larger begins with the same problems, so these two sets are disjoint)."""
    t = cfg.model.tiny
    skip = cfg.data.train_size if t.sft_problems == "unseen" else 0
    train = builtin_split(cfg.data, "train", skip + t.sft_examples, cfg.seed)[skip:]
    if cfg.data.source == "countdown":
        # one solution per problem, all of one family: a warm start that samples with little diversity, on
        # purpose; a problem the family cannot solve is left out
        family = cfg.data.countdown.demo_family
        pairs = [(p.text, demonstration(*parse_answer(p.answer), family)) for p in train]
        pairs = [(prompt, response) for prompt, response in pairs if response is not None]
    else:
        # demonstrations with occasional arithmetic slips: the warm-started policy knows the format and
        # mostly how to add, but often samples a wrong step, a weak start that RL with a verifier improves
        slips = random.Random(f"sft-slips-{cfg.seed}")
        pairs = [(p.text, worked_solution(parse_terms(p.text), slips, t.sft_slip_prob)) for p in train]
    return [(cfg.data.template.replace("{prompt}", prompt), response) for prompt, response in pairs]


def prepare_tiny_model(cfg: Config, progress: bool = True) -> Path:
    """Build tokenizer + model, SFT them on the task's training split, save to `model.path` atomically."""
    task = {"arithmetic": cfg.data.arithmetic, "countdown": cfg.data.countdown}.get(cfg.data.source)
    if task is None or task.style != "worked":
        raise ConfigError("model.source=tiny builds the demo model for a built-in task in its worked style; set "
                          "data.source=arithmetic or countdown, with its style=worked (or prepare another "
                          "model.source)")
    out = Path(cfg.model.path)
    tokenizer = build_tokenizer()
    model = build_tiny_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    t = cfg.model.tiny
    examples = demonstrations(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=t.sft_lr, weight_decay=0.0)
    warmup = max(1, t.sft_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / t.sft_steps)))
    )
    model.train()
    bar = tqdm(sft_batches(tokenizer, examples, t.sft_batch_size, t.sft_steps, cfg.seed),
               total=t.sft_steps, desc="SFT warm start", disable=not progress)
    for ids, labels in bar:
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
