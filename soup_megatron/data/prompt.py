"""What every data source yields: a prompt with its answer, and the error a source refuses bad input with."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SoupError


class DataError(SoupError, ValueError):
    """A data file or row that cannot be used."""


@dataclass(frozen=True)
class Prompt:
    uid: str  # stable id: replay buffers and prefix caches are keyed by it
    text: str  # already laid out by data.template
    answer: str
