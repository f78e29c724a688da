"""Supervised warm start on the task's demonstrations, before RL: the tiny demo model right after it is built
(`model.tiny.sft_*`), and a pretrained checkpoint with `model.source=warm_start` (`model.warm_start.base` in,
`model.path` out), so that a chat model that cannot yet answer a task in its format starts from a policy that
sometimes can.

The demonstrations come from the task's training split, laid out as training lays prompts out (data.template,
and the checkpoint's chat template with data.chat_template); only the response is learned (the prompt's labels
are masked), ending with the tokenizer's EOS (a chat model's end of turn). AdamW, a linear warmup over the first
tenth of the steps, then a cosine decay to zero; gradients clipped at norm 1.
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
from ..data.encoding import PromptFormat
from ..data.prompts import builtin_split
from .hf import load_model, load_tokenizer, pad_rows, save_checkpoint


def demonstrations(cfg: Config, examples: int, problems: str, slip_prob: float = 0.0) -> list[tuple[str, str]]:
    """(laid-out prompt, response) pairs of the task's training split: its first `examples` problems, or with
    problems=unseen the ones after RL's first data.train_size (a split drawn larger begins with the same
    problems, so these two sets are disjoint)."""
    skip = cfg.data.train_size if problems == "unseen" else 0
    train = builtin_split(cfg.data, "train", skip + examples, cfg.seed)[skip:]
    if cfg.data.source == "countdown":
        # one solution per problem, all of one family: a warm start that samples with little diversity, on
        # purpose; a problem the family cannot solve is left out
        task = cfg.data.countdown
        pairs = [(p.text, demonstration(*parse_answer(p.answer), task.demo_family, task.style)) for p in train]
        pairs = [(prompt, response) for prompt, response in pairs if response is not None]
    elif cfg.data.source == "arithmetic" and cfg.data.arithmetic.style == "worked":
        # demonstrations with occasional arithmetic slips: the warm-started policy knows the format and
        # mostly how to add, but often samples a wrong step, a weak start that RL with a verifier improves
        slips = random.Random(f"sft-slips-{cfg.seed}")
        pairs = [(p.text, worked_solution(parse_terms(p.text), slips, slip_prob)) for p in train]
    else:
        raise ConfigError(f"data.source={cfg.data.source}: the warm start has demonstrations for countdown (either "
                          "style) and worked arithmetic only")
    return [(cfg.data.template.replace("{prompt}", prompt), response) for prompt, response in pairs]


def sft_batches(fmt: PromptFormat, examples: list[tuple[str, str]], batch_size: int, steps: int, seed: int):
    """Right-padded (input_ids, labels) batches; labels mask the prompt so only the response is learned."""
    gen = torch.Generator().manual_seed(seed)
    eos = fmt.tokenizer.eos_token_id
    encoded = []
    for prompt, solution in examples:
        p = list(fmt.prompt_ids(prompt))
        r = fmt.tokenizer.encode(solution, add_special_tokens=False) + [eos]
        encoded.append((p + r, [-100] * len(p) + r))
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        ids, _ = pad_rows([encoded[i][0] for i in idx], eos)
        labels, _ = pad_rows([encoded[i][1] for i in idx], -100)
        yield ids, labels


def finetune(model, batches, steps: int, lr: float, progress: bool) -> None:
    """Train `model` on `batches` (see the module docstring)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    bar = tqdm(batches, total=steps, desc="SFT warm start", disable=not progress)
    for ids, labels in bar:
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def prepare_warm_start(cfg: Config, progress: bool = True) -> Path:
    """model.warm_start.base, fine-tuned on the task's demonstrations, saved to model.path atomically."""
    w, out = cfg.model.warm_start, Path(cfg.model.path)
    base = Path(w.base)
    if not (base / "config.json").is_file():
        raise ConfigError(f"model.warm_start.base={w.base}: no checkpoint there; prepare the base model first (for "
                          "SmolLM2: soup-megatron prepare --config configs/smollm2_135m_cpu.yaml)")
    if base.resolve() == out.resolve():
        raise ConfigError(f"model.warm_start.base={w.base} is model.path: the warm start writes a new checkpoint")
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    examples = demonstrations(cfg, w.examples, w.problems)
    if not examples:
        raise ConfigError(f"model.warm_start: no demonstration among {w.examples} training problems "
                          f"(data.countdown.demo_family={cfg.data.countdown.demo_family} solves none of them)")
    finetune(model, sft_batches(PromptFormat.of(tokenizer, cfg.data, str(base)), examples, w.batch_size, w.steps,
                                cfg.seed), w.steps, w.lr, progress)
    return save_checkpoint(model, tokenizer, out)
