"""One base for every refusal the user can act on: bad configuration, data, checkpoints, layouts, servers.

Every command line (`soup-megatron`, tools/*.py) runs its body through `refusals_to_exit_code`: a
`SoupError` becomes one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
Each module's error keeps its own name (and the built-in class it always was, so `except ValueError`
callers still catch it)."""

from __future__ import annotations

import sys
from typing import Callable


class SoupError(Exception):
    """An input or state the run refuses, with a message that says what to change."""

    label = "error"  # what the one-line message starts with


def refusals_to_exit_code(body: Callable[[], int]) -> int:
    """`body()`'s exit code, or 2 after one line `<label>: <message>` on stderr when it refuses."""
    try:
        return body()
    except SoupError as exc:
        print(f"{exc.label}: {' '.join(str(exc).split())}", file=sys.stderr)  # the one deliberate print here
        return 2
