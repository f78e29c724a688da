"""Run logs: `metrics.jsonl` (one line per step), TensorBoard scalars, optionally wandb, PNG curves at the end."""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .io import atomic_write_text


def scalars(record: dict) -> dict[str, float]:
    """The plottable values of a metrics record (finite numbers; not the step itself)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@dataclass
class WandbSettings:
    mode: str  # offline | online
    project: str
    name: str
    config: dict = field(default_factory=dict)


class WandbLog:
    """The same scalars as TensorBoard, into a wandb run under <out_dir>/wandb (offline: `wandb sync` that
    directory later). The run id is kept in <out_dir>/wandb_run_id, so a resumed run logs into the same run;
    steps it redoes after its checkpoint are logged again, and wandb keeps the first value of a step."""

    def __init__(self, out_dir: Path, settings: WandbSettings):
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"trainer.wandb={settings.mode} needs the wandb package (pinned in "
                               "requirements-cpu.txt: bash tools/setup_env.sh installs it)") from None
        id_file = Path(out_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        atomic_write_text(id_file, run_id + "\n")
        self._wandb = wandb
        self.run = wandb.init(mode=settings.mode, project=settings.project, name=settings.name, id=run_id,
                              resume="allow", dir=str(out_dir), config=settings.config,
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()
        self._wandb.teardown()  # waits for wandb's service to write out the run: the files are complete


class MetricsLog:
    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int, wandb: Optional[WandbSettings] = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._writer = None
        self._wandb = WandbLog(out_dir, wandb) if wandb is not None else None
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
            for key, value in scalars(record).items():
                self._writer.add_scalar(key, value, record["step"])
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(record)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


PLOTS = [
    ("reward", ["reward_mean", "reward_mean/mixed", "reward_mean/on_policy"]),
    ("held-out accuracy", ["heldout/greedy_acc", "heldout/pass1"]),
    ("entropy", ["prefix/entropy", "continuation/entropy"]),
    ("clipping: token share, advantage mass", ["prefix/clip_frac", "continuation/clip_frac", "prefix/clip_adv_mass",
                                               "continuation/clip_adv_mass"]),
    ("ratio mean", ["prefix/ratio_mean", "continuation/ratio_mean"]),
    ("response length", ["response_len"]),
    ("held-out distinct correct", ["heldout/distinct_correct"]),
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
    for ax in axes.flat[len(PLOTS):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = out_png.with_name(".tmp-" + out_png.name)
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
