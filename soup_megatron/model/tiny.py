"""The demo model, made locally with nothing downloaded: a character tokenizer built with `tokenizers`
and a ~1M-parameter Qwen2 (`transformers`; a Qwen3-MoE with model.tiny.num_experts), saved as an ordinary
HF checkpoint directory, then warm-started by a short SFT on a built-in task (model/warm_start.py) so the
starting policy is weak but not hopeless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data.encoding import PromptFormat
from .hf import save_checkpoint
from .warm_start import demonstrations, finetune, sft_batches

EOS = "<|endoftext|>"
# The SFT runs on this many torch threads whatever OMP_NUM_THREADS says: how a matmul splits over threads
# changes its float sums, and 600 steps carry that far. The demo model built with 1 thread scored held-out
# greedy 0.81 / sampled pass@1 0.32 and learned too slowly for the demo tests (CI, 2026-12-05), with 2 threads
# 0.93 / 0.40 (this 2-core machine), as the README's figures were measured.
SFT_THREADS = 2


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
    examples = demonstrations(cfg, t.sft_examples, t.sft_problems, t.sft_slip_prob)
    threads = torch.get_num_threads()
    torch.set_num_threads(SFT_THREADS)
    try:
        finetune(model, sft_batches(PromptFormat.of(tokenizer, cfg.data), examples, t.sft_batch_size, t.sft_steps,
                                    cfg.seed), t.sft_steps, t.sft_lr, progress)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (a test worker's, say) for what runs next
    return save_checkpoint(model, tokenizer, out)
