"""Benchmarks behind `soup-megatron bench` and `tools/bench_*.py`: ratios measured side by side in one run.

`step`: step time of SOUP (defaults) and each SOUP cost option against GRPO. Same prompts and samples per
step for every variant. Steps are interleaved (GRPO step s, SOUP step s, SOUP-without-lookahead step s, ...)
so machine noise hits all variants alike; the table reports medians over the measured steps and ratios
to GRPO. Each variant trains in a process of its own (`_interleaved_steps` says why).
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
import multiprocessing as mp
import random
import statistics
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

from ..config import Config, ConfigError, load_config
from ..errors import refusals_to_exit_code
from ..io import atomic_write_text
from ..log import get_logger
from ..train.shutdown import exit_on_signals
from ..train.trainer import Trainer
from .intervals import MIN_PAIRED_STEPS, PairedRatio, paired_ratio
from .step_variants import EVERY_SAMPLE_TRAINED, FROZEN, STEP_VARIANTS, add_step_arguments, step_arguments

log = get_logger(__name__)

MEASURED_STEPS = 10  # the step benchmark's default after its warm-up
STAGES = ["time/rollout", "time/prefix_wait", "time/train", "time/weight_sync", "time/history_drain"]
WORK = ["tokens/decoded", "tokens/history_decoded", "tokens/prefilled", "tokens/prefix", "train/samples_trained"]


def _variant_process(config: str, overrides: list[str], conn) -> None:
    """One variant's trainer, alone in its process as in a run: it takes a step when told and sends the record
    back. After each step it waits for its history worker and counts the wait in the step
    (`time/history_drain`): left running, the worker would generate during the next variant's step, slowing
    that one and making its own history free. Work left over is thus timed as if it did not overlap the
    variant's next step: on shared cores, where the two compete anyway, close to what a run pays."""
    trainer = None
    try:
        exit_on_signals()
        trainer = Trainer(load_config(config, overrides))
        conn.send(("ready", None))
        while (step := conn.recv()) is not None:
            record = trainer.train_step(step)
            drained = time.perf_counter()
            trainer.prefixes.wait_idle()
            record["time/history_drain"] = time.perf_counter() - drained
            record["time/step"] += record["time/history_drain"]
            conn.send(("record", record))
    except BaseException:  # noqa: BLE001 - the parent reports it with the variant's name
        conn.send(("error", traceback.format_exc()))
    finally:
        if trainer is not None:
            trainer.close()


def _answer(name: str, conn):
    try:
        kind, payload = conn.recv()
    except EOFError:
        raise RuntimeError(f"benchmark variant {name!r}: its process died") from None
    if kind == "error":
        raise RuntimeError(f"benchmark variant {name!r} failed:\n{payload}")
    return payload


def _interleaved_steps(config: str, variants: dict[str, list[str]], steps: int, overrides: list[str], tmp: str,
                       more: Optional[Callable[[dict[str, list[dict]]], bool]] = None,
                       max_steps: Optional[int] = None) -> dict[str, list[dict]]:
    """Step records of every variant, steps interleaved (variant A step s, variant B step s, ...): `steps` of
    them, then more while `more(records)` says so, up to `max_steps`.

    Each variant trains in a process of its own, as a run does: in one process, one variant's threads
    slowed the others (with a one-step-off variant beside it, GRPO's tiny step went 0.73 -> 0.89 s). Each
    round runs the variants in an order of its own (shuffled, seeded by the step), so that no variant
    always follows the same one."""
    max_steps = max(steps, max_steps or steps)
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    try:
        for name, extra in variants.items():
            conns[name], child = ctx.Pipe()
            procs.append(ctx.Process(target=_variant_process, name=f"bench-{name}", args=(config, [
                *overrides, *extra, f"trainer.out_dir={Path(tmp) / name.replace(' ', '_')}",
                "trainer.tensorboard=false", "trainer.progress=false", f"trainer.steps={max_steps}"], child)))
            procs[-1].start()
        for name, conn in conns.items():
            _answer(name, conn)  # built
        records: dict[str, list[dict]] = {name: [] for name in conns}
        step = 0
        while step < steps or (more is not None and step < max_steps and more(records)):
            order = list(conns)
            random.Random(f"bench-order-{step}").shuffle(order)
            for name in order:
                conns[name].send(step)
                records[name].append(_answer(name, conns[name]))
            step += 1
            log.info(f"step {step}: " + "  ".join(f"{n} {records[n][-1]['time/step']:.2f}s" for n in order))
        return records
    finally:
        for conn in conns.values():
            try:
                conn.send(None)
            except OSError:
                pass  # that process is gone already
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)


def step_ratios(records: dict[str, list[dict]], warmup: int, key: str = "time/step") -> dict[str, PairedRatio]:
    """Each variant's `key` against GRPO's over the paired steps after the warm-up."""
    base = [r[key] for r in records["GRPO"][warmup:]]
    return {name: paired_ratio(base, [r[key] for r in recs[warmup:]]) for name, recs in records.items()}


def per_trained_sample(records: list[dict]) -> list[float]:
    """Train seconds per trained sample, step by step (a step that trained nothing counts its whole time)."""
    return [r["time/train"] / max(r.get("train/samples_trained", 0.0), 1.0) for r in records]


def _median(records: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in records)


def _step_tables(title: str, records: dict[str, list[dict]], warmup: int) -> list[Table]:
    """The ratios with their intervals, then where each variant's step goes (medians over the same steps)."""
    measured = {name: recs[warmup:] for name, recs in records.items()}
    ratios = step_ratios(records, warmup)
    grpo_train = per_trained_sample(measured["GRPO"])
    steps = [r["time/step"] for r in measured["GRPO"]]
    quartiles = statistics.quantiles(steps, n=4)
    table = Table(title=f"{title}: paired steps {warmup + 1}-{len(records['GRPO'])}, ratios of total time with 95% "
                        "bootstrap intervals")
    table.caption = (f"GRPO's own steps: median {statistics.median(steps):.3f} s, range {min(steps):.3f}-"
                     f"{max(steps):.3f} s, interquartile range {(quartiles[2] - quartiles[0]):.3f} s")
    for column in ("variant", "steps", "step s", "step / GRPO [95% CI]", "train s / sample",
                   "train per sample / GRPO [95% CI]", "decoded / GRPO"):
        table.add_column(column)
    for name, recs in measured.items():
        train = paired_ratio(grpo_train, per_trained_sample(recs))
        decoded = sum(r["tokens/decoded"] for r in recs) / max(sum(r["tokens/decoded"] for r in measured["GRPO"]), 1)
        table.add_row(name, str(ratios[name].steps), f"{_median(recs, 'time/step'):.3f}", str(ratios[name]),
                      f"{statistics.median(per_trained_sample(recs)):.4f}", str(train), f"{decoded:.3f}")
    parts = Table(title="where the time goes: medians per step of the work done and of each stage's share of the "
                        "step (rollout includes the policy's decode; prefix wait: history the step waited for; "
                        "history drain: the history worker's work left when the step ended; one-step-off: the "
                        "rollout runs beside training, so the shares add up to more than 1)")
    for column in ("variant", "policy decoded", "history decoded", "prefilled", "prefix tokens", "samples trained",
                   *(f"{stage.split('/')[1]} share" for stage in STAGES), "other share"):
        parts.add_column(column)
    for name, recs in measured.items():
        shares = [statistics.median(r.get(stage, 0.0) / r["time/step"] for r in recs) for stage in STAGES]
        other = statistics.median(1 - sum(r.get(stage, 0.0) for stage in STAGES) / r["time/step"] for r in recs)
        parts.add_row(name, *(f"{_median(recs, key):.0f}" for key in WORK), *(f"{x:.3f}" for x in shares),
                      f"{other:.3f}")
    return [table, parts]


def _check_steps(steps: int, warmup: int, warmup_from: str = "") -> None:
    if steps <= warmup:
        raise ConfigError(f"--steps {steps} must be larger than --warmup {warmup}{warmup_from}")


def _check_paired_steps(steps: int, warmup: int, target_ci: Optional[float], max_steps: Optional[int],
                        warmup_from: str = "") -> None:
    if target_ci is not None and not target_ci > 0:
        raise ConfigError(f"--target-ci {target_ci} must be > 0 (the half-width of the ratio's interval, e.g. 0.05)")
    if max_steps is not None and max_steps < steps:
        raise ConfigError(f"--max-steps {max_steps} must be at least --steps {steps}")
    _check_steps(steps, warmup, warmup_from)
    if steps - warmup < MIN_PAIRED_STEPS:
        raise ConfigError(f"--steps {steps} with --warmup {warmup}{warmup_from} leaves {steps - warmup} measured "
                          f"step(s); an interval needs at least {MIN_PAIRED_STEPS}: --steps "
                          f"{warmup + MIN_PAIRED_STEPS} or more")


def history_fill_steps(cfg: Config) -> int:
    """Steps before every mixed sample's prefix is drawn from a full history pool: history.keep members (the
    start's, then one every history.interval steps), as seen by jobs made soup.lookahead steps ahead for
    soup.history_steps_per_call steps; 0 when no historical checkpoint writes prefixes. Until then a SOUP step
    generates from fewer versions, so it is cheaper than in a run's steady state (the tiny model: 0.77 s a
    step with one version, 1.08 s with four)."""
    if cfg.soup.mix_fraction == 0 or cfg.soup.prefix_source != "checkpoint":
        return 0
    return cfg.history.interval * (cfg.history.keep - 1) + cfg.soup.lookahead + cfg.soup.history_steps_per_call


def bench_step(config: str, steps: Optional[int], warmup: Optional[int], overrides: list[str],
               records_path: Optional[str] = None, variants: Optional[list[str]] = None,
               target_ci: Optional[float] = None, max_steps: Optional[int] = None,
               learning: bool = False) -> list[Table]:
    """`steps` interleaved steps of every variant (GRPO always runs; default: MEASURED_STEPS after the warm-up),
    the first `warmup` left out (default: until every variant's history pool is full, `history_fill_steps`);
    with `target_ci`, more steps until every variant's step / GRPO interval is at most that half-width, up to
    `max_steps` (default 4 x steps). With `records_path`, every step record of every variant is written there
    as JSON (what `tools/plan_step_time.py --validate` reads)."""
    unknown = sorted(set(variants or []) - set(STEP_VARIANTS))
    if unknown:
        raise ConfigError(f"--variant {unknown[0]!r} is not a benchmark variant; choose from: "
                          + ", ".join(STEP_VARIANTS))
    conditions = [] if learning else [*FROZEN, *EVERY_SAMPLE_TRAINED]
    overrides = [*conditions, *overrides]  # the caller's overrides win
    cfg = load_config(config, overrides)
    chosen = {n: v(cfg) if callable(v) else v for n, v in STEP_VARIANTS.items()
              if not variants or n == "GRPO" or n in variants}
    fill = max(history_fill_steps(load_config(config, [*overrides, *extra])) for extra in chosen.values())
    warmup_from = ""
    if warmup is None:
        warmup = max(fill, 1)
        warmup_from = (" (the default: until every variant's history pool is full, history.interval x "
                       "(history.keep - 1) + soup.lookahead + soup.history_steps_per_call)")
    steps = warmup + MEASURED_STEPS if steps is None else steps
    _check_paired_steps(steps, warmup, target_ci, max_steps, warmup_from)
    more = None
    if target_ci is not None:
        max_steps = max_steps or 4 * steps
        more = lambda records: max(r.half_width for r in step_ratios(records, warmup).values()) > target_ci  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        records = _interleaved_steps(config, chosen, steps, overrides, tmp, more, max_steps)
    if records_path:
        atomic_write_text(Path(records_path), json.dumps({"config": config, "overrides": overrides, "warmup": warmup,
                                                          "variants": chosen, "records": records}, indent=1))
    policy = "policy learning" if learning else f"policy frozen ({' '.join(conditions)})"
    title = (f"SOUP vs GRPO step time ({cfg.rollout.prompts_per_step}x{cfg.rollout.group_size} samples/step, "
             f"{policy}, mix_fraction={cfg.soup.mix_fraction}, lookahead={cfg.soup.lookahead}, "
             f"rollout {cfg.rollout.backend})")
    tables = _step_tables(title, records, warmup)
    tables[0].caption += (f"; history pool full from step {fill + 1}" if fill <= warmup else
                          f"; NOTE: the history pool fills only at step {fill + 1}, so SOUP's earlier steps "
                          "generated from fewer versions than a run's")
    if target_ci is not None:
        widest = max(r.half_width for r in step_ratios(records, warmup).values())
        reached = "reached" if widest <= target_ci else f"NOT reached within --max-steps {max_steps}"
        tables[0].caption += f"; target half-width {target_ci} {reached} (widest: {widest:.3f})"
    return tables


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
    _check_paired_steps(steps, warmup, None, None)
    sglang = [*FROZEN, *EVERY_SAMPLE_TRAINED, *overrides, "rollout.backend=sglang"]
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
    steps_tables = _step_tables("SOUP vs GRPO with SGLang (disk weight sync, policy frozen, every sample trained)",
                                records, warmup)
    cache = Table(title="input tokens (prefilled, not decoded) and the radix cache: medians over the same steps")
    for column in ("variant", "prefix / input tokens", "cached / input tokens"):
        cache.add_column(column)
    for name, recs in records.items():
        inputs = max(_median(recs[warmup:], "tokens/input_tokens"), 1.0)
        cache.add_row(name, f"{_median(recs[warmup:], 'tokens/prefix') / inputs:.3f}",
                      f"{_median(recs[warmup:], 'tokens/cached_tokens') / inputs:.3f}")
    return [throughput, *steps_tables, cache]


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


def steps_and_warmup(name: str, steps: Optional[int], warmup: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """--steps and --warmup as given; unset, the step benchmark derives its own (`bench_step`), the others take
    12 and 2."""
    if name == "step":
        return steps, warmup
    return (12 if steps is None else steps), (2 if warmup is None else warmup)


def print_table(table: Table) -> None:
    Console(width=260).print(table)


def tool_main(name: str, doc: str, argv=None) -> int:
    """The command line of `tools/bench_<name>.py`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, help=f"steps per variant, the warm-up's included (default: the step "
                                                   f"benchmark, warm-up + {MEASURED_STEPS}; the others, 12)")
    parser.add_argument("--warmup", type=int, help="first steps left out (default: the step benchmark, until "
                                                    "every variant's history pool is full; the others, 2)")
    if name == "step":
        add_step_arguments(parser)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    exit_on_signals()
    extra = step_arguments(args) if name == "step" else {}

    def run() -> int:
        steps, warmup = steps_and_warmup(name, args.steps, args.warmup)
        for table in BENCHMARKS[name](args.config, steps, warmup, args.overrides, **extra):
            print_table(table)
        return 0

    return refusals_to_exit_code(run)
