"""Hugging Face model helpers shared by the local actor and the in-process rollout engine."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import SoupError
from ..io import atomic_dir


class CheckpointError(SoupError, ValueError):
    """A checkpoint directory that cannot be loaded."""


# Everything of an HF checkpoint besides its weights: every export (history pool members, disk weight-sync
# exports, megatron exports) carries these, so an SGLang server or `soup-megatron eval` can start on it
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                 "chat_template.jinja", "chat_template.json")


def copy_side_files(src: str | Path, dst: str | Path) -> None:
    """Copy the side files `src` has into `dst`, leaving the ones `dst` already holds (a config the
    exporter wrote itself)."""
    src, dst = Path(src), Path(dst)
    for name in HF_SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def _require_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not an HF checkpoint directory (no config.json); "
                              "for the demo run `soup-megatron prepare --config configs/tiny_cpu.yaml` first")
    return path


def resolve_policy_checkpoint(path: str | Path) -> Path:
    """The HF weights a path stands for: an HF checkpoint directory itself, a trainer checkpoint
    (`step_N/`, whose actor saved `actor/model/`), or a run directory (its `checkpoints/latest`)."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        path = path / "checkpoints" / latest.read_text().strip()
    if (path / "actor" / "model" / "config.json").is_file():
        return path / "actor" / "model"
    return _require_checkpoint(path)


def newline_token_ids(tokenizer) -> frozenset[int]:
    """Every token that ends a line (BPE vocabularies also have "\n\n", ".\n", ...), for cut_at=line."""
    return frozenset(i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("\n"))


def load_model(path: str | Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_require_checkpoint(path), dtype=torch.float32)
    model.eval()
    return model


def save_checkpoint(model, tokenizer, out: str | Path) -> Path:
    """`model` and `tokenizer` as an HF checkpoint directory at `out`, written atomically."""
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_require_checkpoint(path))
    if tok.eos_token_id is None:
        raise CheckpointError(f"{path}: tokenizer has no eos_token")
    return tok


def stop_token_ids(path: str | Path, tokenizer=None) -> frozenset[int]:
    """Every id that ends a response: the tokenizer's EOS and each `eos_token_id` of generation_config.json
    (HF allows a list: chat models often stop on the end of a turn and on the end of text)."""
    tokenizer = tokenizer or load_tokenizer(path)
    ids = {tokenizer.eos_token_id}
    generation = Path(path) / "generation_config.json"
    if generation.is_file():
        named = json.loads(generation.read_text()).get("eos_token_id")
        ids |= set(named if isinstance(named, list) else [] if named is None else [named])
    return frozenset(int(i) for i in ids)


def pad_token_id(tokenizer) -> int:
    """What fills rows past their end (never trained on: its positions carry no loss weight)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory (single or sharded safetensors): a tensor is
    read when asked for, so a rank loads only the slices it holds."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors weights")
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.where = {name: h for h in self.handles for name in h.keys()}

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"HF checkpoint has no tensor {name!r} (is it the architecture config.json says?)")
        return self.where[name].get_tensor(name)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory."""
    reader = HFReader(path)
    return {name: reader.get(name) for name in reader.names()}


_EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def fuse_experts(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with a MoE layer's per-expert tensors as the model holds them. Checkpoints (and exports of the
    megatron actor) store `<layer>.mlp.experts.<e>.{gate,up,down}_proj.weight`; transformers' Qwen3-MoE holds
    `experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and `experts.down_proj`
    [E, H, I]. Tensors of a model that holds them per expert are left as they are."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, tensor in state.items():
        match = _EXPERT_TENSOR.fullmatch(name)
        if match and f"{match[1]}.gate_up_proj" in own:
            fused.setdefault(match[1], {})[int(match[2]), match[3]] = tensor
        else:
            out[name] = tensor
    for prefix, parts in fused.items():
        experts = range(1 + max(e for e, _ in parts))
        if len(parts) != 3 * len(experts):
            raise CheckpointError(f"{prefix}: the experts' tensors are incomplete ({len(parts)} of "
                                  f"{3 * len(experts)} gate/up/down projections)")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[e, "gate_proj"], parts[e, "up_proj"]])
                                                     for e in experts])
        out[f"{prefix}.down_proj"] = torch.stack([parts[e, "down_proj"] for e in experts])
    return out


def load_weights_into(model, source: Path | Mapping[str, torch.Tensor]) -> None:
    """Copy weights into `model`; refuses (and changes nothing) when names or shapes do not match."""
    own = model.state_dict()
    state = fuse_experts(read_state_dict(source) if isinstance(source, (str, Path)) else source, own)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in own if k not in state and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in own]
    bad = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Log-prob of token t given tokens < t, for t >= 1 (shape [N, T-1]); entropy of the same
    distributions when asked. Right padding is assumed (position ids are plain ranges)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one (rows, longest) tensor and its attention mask. Right padding by default; `left` puts
    every row's last token in the last column (where generation continues)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
