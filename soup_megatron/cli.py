"""`soup-megatron` command line: prepare | train | eval."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .data.prompts import DataError
from .history.store import HistoryError
from .model.hf import CheckpointError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=20 soup.mix_fraction=0")


def _table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def cmd_prepare(args) -> int:
    from .model.tiny import prepare_tiny_model

    cfg = load_config(args.config, args.overrides)
    if Path(cfg.model.path, "config.json").is_file() and not args.force:
        print(f"{cfg.model.path} already holds a model; pass --force to rebuild it")
        return 0
    path = prepare_tiny_model(cfg)
    print(f"tiny model saved to {path}")
    return 0


def cmd_train(args) -> int:
    from .metrics import read_metrics
    from .trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    summary = Trainer(cfg).run()
    rows = read_metrics(Path(cfg.trainer.out_dir) / "metrics.jsonl")
    first = next((r for r in rows if r["step"] == 0), None)
    last = next((r for r in reversed(rows) if "heldout/greedy_acc" in r), None)
    if first and last:
        keys = [k for k in ("heldout/greedy_acc", "heldout/pass1") if k in first and k in last]
        _table(f"held-out accuracy, seed {cfg.seed} ({len(rows) - 1} steps, {cfg.trainer.out_dir})",
               [(k, f"{first[k]:.3f}", f"{last[k]:.3f}", f"{last[k] - first[k]:+.3f}") for k in keys],
               ("metric", "before (step 0)", f"after (step {last['step']})", "change"))
    if "plot" in summary:
        print(f"curves: {summary['plot']}   metrics: {Path(cfg.trainer.out_dir) / 'metrics.jsonl'}")
    return 0


def cmd_eval(args) -> int:
    from .data.prompts import load_splits
    from .evaluate import heldout_metrics
    from .model.hf import load_tokenizer
    from .reward import build_reward
    from .rollout import build_engine

    cfg = load_config(args.config, args.overrides)
    path = args.checkpoint or cfg.model.path
    _, heldout = load_splits(cfg.data, cfg.seed)
    engine = build_engine(cfg.rollout.backend, path)
    result = heldout_metrics(engine, load_tokenizer(path), heldout, build_reward(cfg.reward),
                             max_new_tokens=cfg.rollout.max_response_len, temperature=cfg.rollout.temperature,
                             pass_samples=args.n, seed=cfg.seed)
    engine.close()
    _table(f"held-out evaluation of {path} ({len(heldout)} prompts)", [(k, f"{v:.3f}") for k, v in result.items()],
           ("metric", "value"))
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="soup-megatron", description="SOUP RL post-training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the tiny demo tokenizer + model and SFT-warm-start it")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if model.path exists")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("train", help="run SOUP (or GRPO / trajectory mixing) training; resumes from out_dir")
    _config_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="held-out greedy accuracy and sampled pass@1 of a checkpoint")
    _config_args(p)
    p.add_argument("--checkpoint", help="HF checkpoint directory (default: model.path)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt for pass@1 (0: greedy only)")
    p.set_defaults(fn=cmd_eval)
    args = parser.parse_args(argv)
    # SIGTERM (scancel, kill) unwinds like Ctrl-C, so the prefix worker and logs are closed on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, HistoryError) as exc:  # bad input files: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
