"""How a prompt's text becomes the token ids the policy sees, and a response's ids become text.

With `data.chat_template`, the laid-out prompt (data.template) is the one user turn of the checkpoint's
own chat template (after `data.system_prompt`, when set), with the assistant's turn opened
(`add_generation_prompt`); the ids are exactly what the tokenizer's `apply_chat_template` returns, so the
trainer, evaluation, SOUP inference and every rollout server see the same prompt tokens (and share radix-
cache entries). Without it the text is tokenized as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..config import ConfigError, DataConfig


@dataclass
class PromptFormat:
    tokenizer: object
    chat_template: bool = False
    system_prompt: str = ""
    _cache: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, tokenizer, data: DataConfig, source: str = "") -> "PromptFormat":
        if data.chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"data.chat_template=true, but the tokenizer of {source or 'the checkpoint'} has no chat "
                              "template (chat_template.jinja or tokenizer_config.json's chat_template)")
        return cls(tokenizer, data.chat_template, data.system_prompt)

    def messages(self, text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": text}]

    def prompt_ids(self, text: str) -> tuple[int, ...]:
        if text not in self._cache:
            if self.chat_template:
                ids = self.tokenizer.apply_chat_template(self.messages(text), add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)
            else:
                ids = self.tokenizer.encode(text)
            self._cache[text] = tuple(int(i) for i in ids)
        return self._cache[text]

    def response_text(self, ids: Sequence[int]) -> str:
        """What the verifier reads: the response without special tokens (its EOS, a chat turn's end)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
