"""Benchmark files for evaluation, read in the layouts they are published in, without conversion.

| layout        | sets published this way                         | prompt field | answer                        |
|---------------|-------------------------------------------------|--------------|-------------------------------|
| problem       | MATH-500, AMC, AIME (AI-MO, Maxwell-Jia, ...)   | problem      | `answer`                      |
| minerva       | Minerva-Math (Qwen2.5-Math eval layout)         | problem      | last `\\boxed{}` of `solution` |
| olympiadbench | OlympiadBench                                   | question     | `final_answer` (a list)       |
| gsm8k         | GSM8K                                           | question     | text after `####` in `answer` |
| prompt        | this project's own files                        | prompt       | `answer`                      |

Field names match case-insensitively (AIME 2024 files spell them `Problem` / `Answer`). The layout is
detected from the first row, or named; explicit `prompt_field` / `answer_field` override both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .prompts import DataError, Prompt, field_text, read_rows


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


@dataclass(frozen=True)
class FileLayout:
    name: str
    prompt_key: str
    answer_key: str
    answer: Callable[[Path, int, dict, str], str]  # (file, line, row, answer key) -> gold answer text


def _boxed_solution(path: Path, lineno: int, row: dict, key: str) -> str:
    answer = last_boxed(field_text(path, lineno, row, key))
    if not answer or not answer.strip():
        raise DataError(f"{path}:{lineno}: field '{key}' has no \\boxed{{...}} answer")
    return answer


def _answer_list(path: Path, lineno: int, row: dict, key: str) -> str:
    value = row.get(key)
    if isinstance(value, list):
        parts = [str(v).strip() for v in value]
        if not parts or not all(parts):
            raise DataError(f"{path}:{lineno}: field '{key}' must be a non-empty list of answers, got {value!r}")
        return ", ".join(parts)
    return field_text(path, lineno, row, key)


def _after_hashes(path: Path, lineno: int, row: dict, key: str) -> str:
    text = field_text(path, lineno, row, key)
    if "####" not in text:
        raise DataError(f"{path}:{lineno}: field '{key}' has no '#### <answer>' line")
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise DataError(f"{path}:{lineno}: field '{key}' is empty after '####'")
    return answer


# detection order matters: a MATH-500 row also has `solution`, a Minerva row has no `answer`
LAYOUTS = [
    FileLayout("olympiadbench", "question", "final_answer", _answer_list),
    FileLayout("gsm8k", "question", "answer", _after_hashes),
    FileLayout("problem", "problem", "answer", field_text),
    FileLayout("minerva", "problem", "solution", _boxed_solution),
    FileLayout("prompt", "prompt", "answer", field_text),
]
LAYOUT_NAMES = ("auto", *(lay.name for lay in LAYOUTS))


def _lower_keys(path: Path, lineno: int, row: object) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected an object (a JSON line or a Parquet row), got {type(row).__name__}")
    return {str(k).lower(): v for k, v in row.items()}


def detect_layout(path: Path, lineno: int, row: dict) -> FileLayout:
    for layout in LAYOUTS:
        if layout.prompt_key in row and layout.answer_key in row:
            return layout
    known = "; ".join(f"{lay.name}: {lay.prompt_key} + {lay.answer_key}" for lay in LAYOUTS)
    raise DataError(f"{path}:{lineno}: cannot tell the benchmark layout from fields ({', '.join(row)}); "
                    f"known layouts: {known}; or name the fields with --prompt-field/--answer-field")


def load_eval_set(path: str | Path, layout: str = "auto", template: str = "{prompt}",
                  prompt_field: str = "", answer_field: str = "") -> tuple[list[Prompt], str]:
    """(prompts, layout name) of a benchmark file; every row is checked, errors name file and line."""
    path = Path(path)
    if layout not in LAYOUT_NAMES:
        raise DataError(f"layout {layout!r} is unknown; choose one of: {', '.join(LAYOUT_NAMES)}")
    rows = [(lineno, _lower_keys(path, lineno, row)) for lineno, row in read_rows(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    named = next((lay for lay in LAYOUTS if lay.name == layout), None)
    if prompt_field or answer_field:  # the named layout's (or plain) answer reading, on the given fields
        base = named or LAYOUTS[-1]
        chosen = FileLayout("fields", (prompt_field or base.prompt_key).lower(),
                            (answer_field or base.answer_key).lower(), base.answer)
    else:
        chosen = named or detect_layout(path, *rows[0])
    prompts = []
    for lineno, row in rows:
        text = field_text(path, lineno, row, chosen.prompt_key)
        answer = chosen.answer(path, lineno, row, chosen.answer_key)
        prompts.append(Prompt(uid=f"{path.name}:{lineno}", text=template.replace("{prompt}", text), answer=answer))
    return prompts, chosen.name
