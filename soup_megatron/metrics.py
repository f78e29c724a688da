"""Run logs: `metrics.jsonl` (one line per step), TensorBoard scalars, PNG curves at the end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .io import atomic_write_text


class MetricsLog:
    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop their old lines (all of them when
        the run starts afresh after dying before its first checkpoint)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines() if step > 0 else []:  # a fresh start keeps nothing
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                pass  # a line a crash cut short: its step is redone
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, record["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


PLOTS = [
    ("reward", ["reward_mean", "reward_mean/mixed", "reward_mean/on_policy"]),
    ("held-out accuracy", ["heldout/greedy_acc", "heldout/pass1"]),
    ("entropy", ["prefix/entropy", "continuation/entropy"]),
    ("clip fraction", ["prefix/clip_frac", "continuation/clip_frac"]),
    ("ratio mean", ["prefix/ratio_mean", "continuation/ratio_mean"]),
    ("response length", ["response_len"]),
    ("step time (s)", ["time/rollout", "time/prefix_wait", "time/train", "time/weight_sync", "time/history"]),
]


def plot_curves(metrics_path: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (title, keys) in zip(axes.flat, PLOTS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    axes.flat[-1].axis("off")
    fig.tight_layout()
    tmp = out_png.with_name(".tmp-" + out_png.name)
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
