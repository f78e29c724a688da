"""Small things tests share: a custom reward function (imported by path), process inspection, waiting for
an observable event (never a fixed sleep before an assertion about state)."""

import time
from pathlib import Path


def length_reward(response: str, answer: str) -> float:
    return float(len(response))


def half_constant_reward(response: str, answer: str) -> float:
    """0 for prompts with an even answer (their groups' rewards are all equal), the length otherwise."""
    return 0.0 if int(answer) % 2 == 0 else float(len(response))


def _stat_fields(pid) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]; [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def child_pids(parent: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and _stat_fields(p.name)[1:2] == [str(parent)]]


def alive(pid: int) -> bool:
    """Running (a zombie whose parent never reaps it does not count)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def descendant_pids(parent: int) -> list[int]:
    """Children, their children, and so on."""
    out, todo = [], [parent]
    while todo:
        kids = child_pids(todo.pop())
        out += kids
        todo += kids
    return out


def wait_until(condition, timeout: float = 60.0, poll: float = 0.05) -> bool:
    """True as soon as `condition()` holds, False if it still does not after `timeout` seconds."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() >= deadline:
            return False
        time.sleep(poll)
    return True
