"""Benchmarks behind `soup-megatron bench` and `tools/bench_*.py`: ratios measured side by side in one run.

`step`: step time of SOUP (defaults) and each SOUP cost option against GRPO. Same prompts and samples per
step for every variant. Steps are interleaved (GRPO step s, SOUP step s, SOUP-without-lookahead step s, ...)
so machine noise hits all variants alike; the table reports medians over the measured steps and ratios
to GRPO.
`rollout`: the SGLang server against the in-process engine on the same requests (tokens/s), then SOUP
against GRPO with SGLang serving rollouts and prefixes: step time, decoded tokens, radix-cache hits,
and weight sync as a fraction of the step; with rollout.sglang.policy_servers >= 2, SOUP once more with
each request sent to the least-loaded server instead of its prompt's (what routing buys).
`actor`: tokens/s of the log-prob pass and the training pass (one SOUP update) of the megatron actor
against the local actor, on the same model and batch, passes alternating. One process (TP=1); run it
under torchrun with actor.megatron.tensor_parallel=N for a parallel megatron actor.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from ..config import Config, ConfigError, load_config
from ..errors import refusals_to_exit_code
from ..io import atomic_write_text
from ..log import get_logger
from ..train.shutdown import exit_on_signals
from ..train.trainer import Trainer

log = get_logger(__name__)

STEP_VARIANTS = {
    "GRPO": ["soup.mix_fraction=0"],
    "SOUP history per sample": ["soup.history_per_prompt=0"],  # the design before shared trajectories
    "SOUP": [],
    "SOUP cut_of=max_length": ["soup.cut_of=max_length"],
    "SOUP history_steps_per_call=2": ["soup.history_steps_per_call=2"],
    "SOUP max_length + steps_per_call=2": ["soup.cut_of=max_length", "soup.history_steps_per_call=2"],
    "SOUP lookahead=0": ["soup.lookahead=0"],
    "GRPO one-step-off": ["soup.mix_fraction=0", "rollout.async_steps=1", "algo.rollout_correction=tis"],
    "SOUP one-step-off": ["rollout.async_steps=1", "algo.rollout_correction=tis"],
    # padding: micro-batches of a quarter of actor.micro_batch_size rows, in order, against rows sorted by
    # length into micro-batches of a token budget of that many rows of rollout.max_response_len tokens
    "SOUP micro-batches of micro_batch_size/4 rows": lambda cfg: [
        f"actor.micro_batch_size={max(1, cfg.actor.micro_batch_size // 4)}"],
    "SOUP token budget of micro_batch_size/4 x max_response_len": lambda cfg: [
        f"actor.max_tokens_per_micro_batch={max(1, cfg.actor.micro_batch_size // 4) * cfg.rollout.max_response_len}"],
}
STEP_COLUMNS = ["time/step", "time/rollout", "time/rollout_wait", "time/prefix_wait", "time/train", "time/weight_sync",
                "time/history", "time/prefix_generate", "tokens/decoded", "tokens/prefilled", "tokens/prefix",
                "tokens/history_decoded", "train/samples_trained", "train/padding_share"]


def _interleaved_steps(config: str, variants: dict[str, list[str]], steps: int, overrides: list[str],
                       tmp: str) -> dict[str, list[dict]]:
    """Step records of every variant, steps interleaved (variant A step s, variant B step s, ...)."""
    trainers: dict[str, Trainer] = {}
    try:
        for name, extra in variants.items():
            cfg = load_config(config, [*overrides, *extra, f"trainer.out_dir={Path(tmp) / name.replace(' ', '_')}",
                                       "trainer.tensorboard=false", "trainer.progress=false"])
            trainers[name] = Trainer(cfg)
        records: dict[str, list[dict]] = {name: [] for name in trainers}
        for step in range(steps):
            for name, trainer in trainers.items():
                records[name].append(trainer.train_step(step))
            log.info(f"step {step + 1}/{steps}: " + "  ".join(
                f"{n} {records[n][-1]['time/step']:.2f}s" for n in trainers))
        return records
    finally:
        for trainer in trainers.values():
            trainer.close()


def _step_table(title: str, records: dict[str, list[dict]], warmup: int, columns: list[str]) -> Table:
    medians = {name: {c: statistics.median(r.get(c, 0.0) for r in recs[warmup:]) for c in columns}
               for name, recs in records.items()}
    table = Table(title=f"{title}, medians of steps {warmup + 1}-{len(next(iter(records.values())))}")
    table.add_column("variant")
    for c in columns:
        table.add_column(c.split("/")[-1])
    table.add_column("step / GRPO")
    table.add_column("decoded / GRPO")
    base = medians["GRPO"]
    for name, m in medians.items():
        table.add_row(name, *[f"{m[c]:.3f}" if c.startswith(("time", "train/padding")) else f"{m[c]:.0f}"
                              for c in columns],
                      f"{m['time/step'] / base['time/step']:.3f}",
                      f"{m['tokens/decoded'] / base['tokens/decoded']:.3f}")
    return table


def _check_steps(steps: int, warmup: int) -> None:
    if steps <= warmup:
        raise ConfigError(f"--steps {steps} must be larger than --warmup {warmup}")


def bench_step(config: str, steps: int, warmup: int, overrides: list[str],
               records_path: Optional[str] = None, variants: Optional[list[str]] = None) -> list[Table]:
    """With `records_path`, every step record of every variant is written there as JSON (what
    `tools/plan_step_time.py --validate` reads); `variants` picks some of STEP_VARIANTS (GRPO always runs)."""
    _check_steps(steps, warmup)
    unknown = sorted(set(variants or []) - set(STEP_VARIANTS))
    if unknown:
        raise ConfigError(f"--variant {unknown[0]!r} is not a benchmark variant; choose from: "
                          + ", ".join(STEP_VARIANTS))
    cfg = load_config(config, overrides)
    chosen = {n: v(cfg) if callable(v) else v for n, v in STEP_VARIANTS.items()
              if not variants or n == "GRPO" or n in variants}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        records = _interleaved_steps(config, chosen, steps, overrides, tmp)
    if records_path:
        atomic_write_text(Path(records_path), json.dumps({"config": config, "overrides": overrides, "warmup": warmup,
                                                          "variants": chosen, "records": records}, indent=1))
    samples = f"{cfg.rollout.prompts_per_step}x{cfg.rollout.group_size}"
    return [_step_table(f"SOUP vs GRPO step time ({samples} samples/step, "
                        f"mix_fraction={cfg.soup.mix_fraction}, lookahead={cfg.soup.lookahead}, "
                        f"rollout {cfg.rollout.backend})", records, warmup, STEP_COLUMNS)]


def _engine_throughput(cfg: Config, reps: int, tmp: str) -> Table:
    """Tokens/s of the in-process engine and of one SGLang server on the same requests, alternating."""
    from ..data.encoding import PromptFormat
    from ..data.prompts import load_splits, prompts_for_step
    from ..model.hf import load_tokenizer
    from ..rollout import build_engine
    from ..rollout.base import GenerationRequest
    from ..rollout.sglang_servers import RolloutServers
    from ..train.runtime import in_process_engine

    fmt = PromptFormat.of(load_tokenizer(cfg.model.path), cfg.data, cfg.model.path)
    prompts = prompts_for_step(load_splits(cfg.data, cfg.seed)[0], 0, cfg.rollout.prompts_per_step, cfg.seed)
    requests = [GenerationRequest(fmt.prompt_ids(p.text), (), cfg.rollout.max_response_len)
                for p in prompts for _ in range(cfg.rollout.group_size)]
    servers = RolloutServers(cfg.rollout.sglang, cfg.model.path, Path(tmp), ["policy"]).start()
    try:
        engines = {"in-process": in_process_engine(cfg.rollout, cfg.model.path),
                   "SGLang (1 server)": build_engine(cfg.rollout, cfg.model.path, 0, tmp)}
        seconds: dict[str, list[float]] = {n: [] for n in engines}
        tokens: dict[str, list[int]] = {n: [] for n in engines}
        for rep in range(reps):
            for name, engine in engines.items():
                started = time.perf_counter()
                gens = engine.generate(requests, cfg.rollout.temperature, rep)
                seconds[name].append(time.perf_counter() - started)
                tokens[name].append(sum(len(g.token_ids) for g in gens))
    finally:
        servers.close()
    table = Table(title=f"generation throughput, {len(requests)} requests x up to {cfg.rollout.max_response_len} "
                        f"tokens, medians of {reps} alternating repeats")
    for column in ("engine", "seconds", "tokens", "tokens/s", "tokens/s vs in-process"):
        table.add_column(column)
    base = statistics.median(tokens["in-process"]) / statistics.median(seconds["in-process"])
    for name in engines:
        rate = statistics.median(tokens[name]) / statistics.median(seconds[name])
        table.add_row(name, f"{statistics.median(seconds[name]):.3f}", f"{statistics.median(tokens[name]):.0f}",
                      f"{rate:.0f}", f"{rate / base:.3f}")
    return table


def bench_rollout(config: str, steps: int, warmup: int, overrides: list[str]) -> list[Table]:
    """SGLang against the in-process engine, then SOUP against GRPO with SGLang serving both."""
    _check_steps(steps, warmup)
    sglang = [*overrides, "rollout.backend=sglang"]
    cfg = load_config(config, sglang)
    if not Path(cfg.rollout.sglang.python).is_file():
        raise ConfigError(f"rollout.sglang.python={cfg.rollout.sglang.python}: no SGLang venv; "
                          "run `bash tools/setup_sglang.sh` first")
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        throughput = _engine_throughput(cfg, steps, str(Path(tmp) / "engines"))
        variants = {"GRPO": STEP_VARIANTS["GRPO"], "SOUP": []}
        if cfg.rollout.sglang.policy_servers > 1:  # with one server both routings send everything to it
            variants["SOUP least-loaded routing"] = ["rollout.sglang.routing=least_loaded"]
        records = _interleaved_steps(config, variants, steps, sglang, tmp)
    columns = ["time/step", "time/rollout", "time/prefix_wait", "time/train", "time/weight_sync", "tokens/decoded",
               "tokens/prefix", "tokens/input_tokens", "tokens/cached_tokens"]
    steps_table = _step_table("SOUP vs GRPO with SGLang (disk weight sync)", records, warmup, columns)
    cache = Table(title="input tokens (prefilled, not decoded), radix cache, weight sync: medians over the same steps")
    for column in ("variant", "prefix / input tokens", "cached / input tokens", "weight sync / step time"):
        cache.add_column(column)
    for name, recs in records.items():
        m = {c: statistics.median(r.get(c, 0.0) for r in recs[warmup:]) for c in columns}
        inputs = max(m["tokens/input_tokens"], 1.0)
        cache.add_row(name, f"{m['tokens/prefix'] / inputs:.3f}", f"{m['tokens/cached_tokens'] / inputs:.3f}",
                      f"{m['time/weight_sync'] / m['time/step']:.3f}")
    return [throughput, steps_table, cache]


def _actor_batch(cfg: Config, vocab_size: int):
    """One step's worth of samples: prompt (16 tokens), historical prefix, on-policy continuation, full
    response length, advantages of both signs."""
    import torch

    from ..actor.base import TokenBatch
    from ..sample import CONTINUATION, PREFIX

    n = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    width = 16 + cfg.rollout.max_response_len
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(1, vocab_size, (n, width), generator=g)
    segment = torch.zeros(n, width - 1, dtype=torch.long)
    segment[:, 15:] = CONTINUATION
    segment[: n // 2, 15: 15 + cfg.rollout.max_response_len // 2] = PREFIX
    logp = torch.full((n, width - 1), -1.0)
    return TokenBatch(ids, torch.ones_like(ids), segment, logp, torch.zeros_like(segment), torch.randn(n, generator=g),
                      old_logp=logp.clone())


def bench_actor(config: str, steps: int, warmup: int, overrides: list[str]) -> list[Table]:
    """Megatron actor against the local actor: log-prob pass and training pass, alternating."""
    from ..actor import build_actor
    from ..algo.loss import LossConfig
    from ..model.hf import load_tokenizer
    from ..train.runtime import follow, is_follower

    _check_steps(steps, warmup)
    cfg = load_config(config, overrides)
    megatron_cfg = replace(cfg.actor, backend="megatron")
    if is_follower(megatron_cfg):  # under torchrun: the other ranks of the megatron actor
        follow(megatron_cfg, cfg.model.path)
        return []
    actors = {"local": build_actor(replace(cfg.actor, backend="local"), cfg.model.path),
              "megatron": build_actor(megatron_cfg, cfg.model.path)}
    batch = _actor_batch(cfg, len(load_tokenizer(cfg.model.path)))
    tokens = int(batch.attention_mask.sum())
    loss_cfg = LossConfig.from_config(cfg)
    seconds: dict[str, dict[str, list[float]]] = {n: {"logprobs": [], "train": []} for n in actors}
    try:
        for rep in range(steps):
            for name, actor in actors.items():
                started = time.perf_counter()
                actor.logprobs(batch, cfg.rollout.temperature)
                seconds[name]["logprobs"].append(time.perf_counter() - started)
                started = time.perf_counter()
                actor.train_minibatch(batch, loss_cfg, cfg.rollout.temperature)
                seconds[name]["train"].append(time.perf_counter() - started)
            log.info(f"repeat {rep + 1}/{steps}")
    finally:
        for actor in actors.values():
            actor.close()
    mc = cfg.actor.megatron
    table = Table(title=f"actor passes on {cfg.model.path}: megatron at TP={mc.tensor_parallel} x "
                        f"PP={mc.pipeline_parallel}"
                        f"{f' x VP={mc.virtual_pipeline}' if mc.virtual_pipeline > 1 else ''}"
                        f"{f' x CP={mc.context_parallel}' if mc.context_parallel > 1 else ''}, "
                        f"{len(batch)} samples x "
                        f"{batch.input_ids.shape[1]} tokens, "
                        f"micro-batch {cfg.actor.micro_batch_size}, medians of repeats {warmup + 1}-{steps}")
    for column in ("actor", "log-prob pass s", "log-prob tokens/s", "vs local", "train pass s", "train tokens/s",
                   "vs local"):
        table.add_column(column)
    median = {n: {k: statistics.median(v[warmup:]) for k, v in s.items()} for n, s in seconds.items()}
    for name, m in median.items():
        table.add_row(name, f"{m['logprobs']:.3f}", f"{tokens / m['logprobs']:.0f}",
                      f"{median['local']['logprobs'] / m['logprobs']:.3f}", f"{m['train']:.3f}",
                      f"{tokens / m['train']:.0f}", f"{median['local']['train'] / m['train']:.3f}")
    return [table]


BENCHMARKS = {"step": bench_step, "rollout": bench_rollout, "actor": bench_actor}


def print_table(table: Table) -> None:
    Console(width=260).print(table)


def tool_main(name: str, doc: str, argv=None) -> int:
    """The command line of `tools/bench_<name>.py`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    if name == "step":
        parser.add_argument("--records", metavar="FILE.json", help="also write every step record there")
        parser.add_argument("--variant", action="append", metavar="NAME",
                            help=f"run only these variants besides GRPO (repeat): {', '.join(STEP_VARIANTS)}")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    exit_on_signals()
    extra = {"records_path": args.records, "variants": args.variant} if name == "step" else {}

    def run() -> int:
        for table in BENCHMARKS[name](args.config, args.steps, args.warmup, args.overrides, **extra):
            print_table(table)
        return 0

    return refusals_to_exit_code(run)
