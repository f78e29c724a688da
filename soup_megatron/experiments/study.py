"""The study: SOUP, its variants and the baselines, over several seeds at an equal sample budget.

A study config names a base run config, overrides shared by every run, the variants (each a list of
overrides) and the seeds. Every (variant, seed) trains in `out_dir/<variant>/seed<N>`; when it has
finished, a final held-out evaluation (greedy accuracy, pass@k) and the run's training statistics go
into its `result.json`. A run with a `result.json` is not run again; a run that was stopped part-way
resumes from its own trainer checkpoint. The study then writes `results.json`, `results.md` (mean and
std over seeds, the paired comparisons, the curves at each held-out evaluation, and every seed) and
`study.png` (the same curves: every variant averaged over seeds). `sweep --report` writes them from the
runs finished so far.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import Config, ConfigError, changed_keys, load_config
from ..io import atomic_write_json, atomic_write_text, read_json
from ..log import get_logger
from ..metrics import read_metrics
from .intervals import paired_difference

log = get_logger(__name__)


@dataclass
class StudyEvalConfig:
    n: int = 16  # samples per held-out problem
    k: list[int] = field(default_factory=lambda: [1, 4, 16])


@dataclass
class StudyConfig:
    base: str = "configs/tiny_cpu.yaml"
    out_dir: str = "runs/study"
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    overrides: list[str] = field(default_factory=list)  # applied to every run, before the variant's
    variants: dict[str, list[str]] = field(default_factory=dict)
    eval: StudyEvalConfig = field(default_factory=StudyEvalConfig)
    last_steps: int = 10  # training statistics (entropy, clip fraction) are averaged over the last steps
    # [variant, baseline] pairs compared seed by seed; empty: every variant against the first
    pairs: list[list[str]] = field(default_factory=list)


def columns(study: StudyConfig) -> list[tuple[str, str]]:
    """What the results table shows per run: (column, key in result.json)."""
    return [("greedy", "final/greedy_acc"), *((f"pass@{k}", f"final/pass@{k}") for k in study.eval.k),
            ("distinct correct", "final/distinct_correct"), ("reward", "train/reward_mean"),
            ("entropy prefix", "train/prefix/entropy"), ("entropy cont.", "train/continuation/entropy"),
            ("clip prefix", "train/prefix/clip_frac"), ("clip cont.", "train/continuation/clip_frac"),
            ("clip mass prefix", "train/prefix/clip_adv_mass"), ("clip mass cont.", "train/continuation/clip_adv_mass"),
            ("step s", "time/step_median"), ("run s", "time/run_wall")]


def load_study(path: str, overrides: list[str] = ()) -> StudyConfig:
    """The study config, validated: every run's config is built (and so checked) before anything runs."""
    if not Path(path).is_file():
        raise ConfigError(f"study config {path} does not exist")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudyConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]} (allowed keys: base, out_dir, seeds, overrides, "
                          "variants, eval.n, eval.k, last_steps, pairs)") from None
    study: StudyConfig = OmegaConf.to_object(merged)
    if not study.variants:
        raise ConfigError(f"{path}: 'variants' is empty; name at least one variant (a list of overrides)")
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of distinct integers, got {study.seeds}")
    for name in study.variants:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{path}: variant name {name!r} must be letters, digits, '_', '.' or '-' "
                              "(it names a folder)")
    for pair in study.pairs:
        if len(pair) != 2 or any(name not in study.variants for name in pair) or pair[0] == pair[1]:
            raise ConfigError(f"{path}: pairs entry {pair}: expected [variant, baseline], two different variants of "
                              f"{', '.join(study.variants)}")
    if study.eval.n < 1 or not study.eval.k or max(study.eval.k) > study.eval.n or min(study.eval.k) < 1:
        raise ConfigError(f"{path}: eval.k={study.eval.k} must be positive and at most eval.n={study.eval.n}")
    budgets = {}
    for name in study.variants:
        cfg = run_config(study, name, study.seeds[0])
        budgets[name] = cfg.trainer.steps * cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if len(set(budgets.values())) > 1:
        raise ConfigError(f"{path}: variants must train on equal sample budgets (steps x prompts x group size); got "
                          + ", ".join(f"{n}: {b}" for n, b in budgets.items()))
    return study


def run_config(study: StudyConfig, variant: str, seed: int) -> Config:
    try:
        return load_config(study.base, [*study.overrides, *study.variants[variant], f"seed={seed}",
                                        f"trainer.out_dir={run_dir(study, variant, seed)}"])
    except ConfigError as exc:
        raise ConfigError(f"study variant '{variant}': {exc}") from None


def run_dir(study: StudyConfig, variant: str, seed: int) -> Path:
    return Path(study.out_dir) / variant / f"seed{seed}"


def finished_result(study: StudyConfig, variant: str, seed: int) -> Optional[dict]:
    """The run's result.json when it has finished (with this study's config for it), else None."""
    out = run_dir(study, variant, seed)
    if not (out / "result.json").is_file():
        return None
    changes = changed_keys(out / "config.yaml", run_config(study, variant, seed))
    if changes:
        raise ConfigError(f"{out} holds a finished run with another config ({'; '.join(changes)}); "
                          "delete that folder to run it again")
    return read_json(out / "result.json")


def train_and_evaluate(study: StudyConfig, variant: str, seed: int) -> dict:
    """One run: train (resuming if it was stopped), evaluate the final policy, write result.json."""
    from ..data.encoding import PromptFormat
    from ..data.prompts import load_splits
    from ..evaluate import Sampling, evaluate
    from ..model.hf import load_tokenizer, resolve_policy_checkpoint
    from ..reward import build_reward
    from ..train.runtime import in_process_engine
    from ..train.trainer import Trainer

    cfg = run_config(study, variant, seed)
    out = Path(cfg.trainer.out_dir)
    done = finished_result(study, variant, seed)
    if done is not None:
        return done
    Trainer(cfg).run()
    started = time.perf_counter()
    policy = resolve_policy_checkpoint(out)
    engine = in_process_engine(cfg.rollout, policy)  # the run's servers are gone
    fmt = PromptFormat.of(load_tokenizer(policy), cfg.data, policy)
    try:
        final = evaluate(engine, fmt, load_splits(cfg.data, cfg.seed)[1], build_reward(cfg.reward),
                         n=study.eval.n, ks=study.eval.k,
                         sampling=Sampling(cfg.rollout.max_response_len, cfg.rollout.temperature, cfg.seed))
    finally:
        engine.close()
    rows = read_metrics(out / "metrics.jsonl")
    trained = [r for r in rows if r["step"] > 0]
    tail = trained[-study.last_steps:]
    result = {"variant": variant, "seed": seed, "steps": cfg.trainer.steps,
              "final/greedy_acc": final["greedy_acc"], **{f"final/{k}": v for k, v in final["sampled"].items()},
              "time/step_median": statistics.median(r["time/step"] for r in trained),
              "time/run_wall": sum(r["time/step"] + r.get("time/eval", 0.0) for r in trained)
              + time.perf_counter() - started}
    for key in ("reward_mean", *(f"{segment}/{stat}" for stat in ("entropy", "clip_frac", "ratio_out_frac",
                                                                  "clip_adv_mass", "ratio_mean")
                                 for segment in ("prefix", "continuation"))):
        values = [r[key] for r in tail if key in r]
        if values:
            result[f"train/{key}"] = sum(values) / len(values)
    atomic_write_json(out / "result.json", result)
    return result


def summarize(results: list[dict]) -> dict[str, dict[str, dict]]:
    """variant -> key -> {mean, std, values} over seeds (std = sample std; 0 for one seed)."""
    out: dict[str, dict[str, dict]] = {}
    for r in results:
        per_variant = out.setdefault(r["variant"], {})
        for key, value in r.items():
            if isinstance(value, float):
                per_variant.setdefault(key, {"values": []})["values"].append(value)
    for per_variant in out.values():
        for stat in per_variant.values():
            v = stat["values"]
            stat.update(mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0)
    return out


def _cell(stat: Optional[dict]) -> str:
    return "-" if stat is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def comparisons(study: StudyConfig) -> list[tuple[str, str]]:
    """(variant, baseline) pairs of the paired table: the study's `pairs`, or every variant against the first."""
    if study.pairs:
        return [(variant, baseline) for variant, baseline in study.pairs]
    first = next(iter(study.variants))
    return [(variant, first) for variant in list(study.variants)[1:]]


def paired_markdown(study: StudyConfig, results: list[dict]) -> list[str]:
    """Each compared variant against its baseline, seed by seed, on the final held-out results."""
    by_run = {(r["variant"], r["seed"]): r for r in results}
    keys = [("greedy", "final/greedy_acc"), ("pass@1", "final/pass@1"),
            (f"pass@{max(study.eval.k)}", f"final/pass@{max(study.eval.k)}"),
            ("distinct correct", "final/distinct_correct")]
    rows = []
    for variant, baseline in comparisons(study):
        seeds = [s for s in study.seeds if (variant, s) in by_run and (baseline, s) in by_run]
        if len(seeds) < 2:
            continue
        cells = []
        for _, key in keys:
            cells.append(str(paired_difference([by_run[(baseline, s)][key] for s in seeds],
                                               [by_run[(variant, s)][key] for s in seeds])))
        rows.append(f"| {variant} | {baseline} | {len(seeds)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Paired by seed, variant minus baseline: mean difference [95% t interval], paired t, two-sided p "
            "(seeds where the variant is higher / seeds):", "",
            "| variant | baseline | seeds | " + " | ".join(c for c, _ in keys) + " |", "|---" * (len(keys) + 3) + "|",
            *rows]


def results_markdown(study: StudyConfig, results: list[dict], wall_s: float,
                     curves: dict[str, dict[str, dict[int, float]]]) -> str:
    summary = summarize(results)
    shown = [(c, k) for c, k in columns(study) if any(k in v for v in summary.values())]
    runs = len(study.variants) * len(study.seeds)
    lines = [f"Study `{study.out_dir}`: {len(study.variants)} variants x seeds {study.seeds}"
             f"{'' if len(results) == runs else f' ({len(results)} of {runs} runs finished)'}; final held-out "
             f"evaluation with n={study.eval.n}; training statistics averaged over the last {study.last_steps} steps; "
             f"mean ± std over seeds. Wall time of these runs: {wall_s / 60:.1f} min.", "",
             "| variant | " + " | ".join(c for c, _ in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for variant, stats in summary.items():
        lines.append(f"| {variant} | " + " | ".join(_cell(stats.get(k)) for _, k in shown) + " |")
    lines += paired_markdown(study, results)
    lines += curves_markdown(study, curves)
    lines += ["", "Every seed:", "", "| variant | seed | " + " | ".join(c for c, _ in shown) + " |",
              "|---" * (len(shown) + 2) + "|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['seed']} | "
                     + " | ".join(f"{r[k]:.3f}" if k in r else "-" for _, k in shown) + " |")
    return "\n".join(lines) + "\n"


def curve_panels(study: StudyConfig) -> list[tuple[str, str]]:
    """What the curves show, (title, key in metrics.jsonl): held-out pass@1, pass@k at the largest k evaluated
    during training, distinct correct solutions per problem, greedy accuracy, training reward and the
    continuation's entropy (together, what shows a policy saturating)."""
    panels = [("held-out pass@1", "heldout/pass1")]
    pass_k = run_config(study, next(iter(study.variants)), study.seeds[0]).trainer.eval_pass_k
    if pass_k:
        panels += [(f"held-out pass@{max(pass_k)}", f"heldout/pass@{max(pass_k)}"),
                   ("held-out distinct correct", "heldout/distinct_correct")]
    return panels + [("held-out greedy", "heldout/greedy_acc"), ("training reward", "reward_mean"),
                     ("entropy of the continuation", "continuation/entropy")]


def mean_curves(study: StudyConfig, results: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """variant -> key -> step -> mean over the seeds of its finished runs, for every curve panel; the per-step
    training statistics (noisy) as the mean of the 5 steps ending at that step."""
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for variant in study.variants:
        runs = [read_metrics(run_dir(study, variant, r["seed"]) / "metrics.jsonl") for r in results
                if r["variant"] == variant]
        if not runs:
            continue
        for _, key in curve_panels(study):
            by_step: dict[int, list[float]] = {}
            for rows in runs:
                for r in rows:
                    if key in r:
                        by_step.setdefault(r["step"], []).append(r[key])
            steps = sorted(by_step)
            means = [statistics.fmean(by_step[s]) for s in steps]
            if not key.startswith("heldout/"):
                means = [statistics.fmean(means[max(0, i - 4):i + 1]) for i in range(len(means))]
            curves.setdefault(variant, {})[key] = dict(zip(steps, means))
    return curves


def curves_markdown(study: StudyConfig, curves: dict[str, dict[str, dict[int, float]]]) -> list[str]:
    """The curves at each held-out evaluation step, as a table (the numbers behind study.png)."""
    panels = curve_panels(study)
    lines = ["", "During training, at each held-out evaluation (mean over seeds; reward and entropy: the mean of "
             "the 5 steps ending there):", "", "| variant | step | " + " | ".join(t for t, _ in panels) + " |",
             "|---" * (len(panels) + 2) + "|"]
    for variant, by_key in curves.items():
        for step in sorted(by_key.get("heldout/pass1", {})):
            lines.append(f"| {variant} | {step} | " + " | ".join(
                f"{by_key[key][step]:.3f}" if step in by_key.get(key, {}) else "-" for _, key in panels) + " |")
    return lines


def plot_study(study: StudyConfig, curves: dict[str, dict[str, dict[int, float]]], out_png: Path) -> Path:
    """The curves, one panel each, every variant's mean over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curve_panels(study)
    columns = 3
    grid_rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(grid_rows, columns, figsize=(6 * columns, 4.5 * grid_rows), squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(panels):]:
        ax.axis("off")
    colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 variants
    for index, variant in enumerate(study.variants):
        for ax, (title, key) in zip(axes, panels):
            curve = curves.get(variant, {}).get(key, {})
            ax.plot(list(curve), list(curve.values()), label=variant, color=colors[index % len(colors)],
                    linestyle="-" if index < len(colors) else "--")
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = out_png.with_name(".tmp-" + out_png.name)
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def run_study(study: StudyConfig, only: list[str] = ()) -> list[dict]:
    """Train and evaluate every (variant, seed) not finished yet, or only the variants named in `only` (so that
    parts of one study can run side by side, each process on its own variants), then report on all finished."""
    unknown = [name for name in only if name not in study.variants]
    if unknown:
        raise ConfigError(f"--variant {unknown[0]!r}: not a variant of this study (its variants: "
                          f"{', '.join(study.variants)})")
    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.yaml", OmegaConf.to_yaml(OmegaConf.structured(study)))
    # seed-major: a partial study covers all variants
    runs = [(v, s) for s in study.seeds for v in study.variants if not only or v in only]
    for i, (variant, seed) in enumerate(runs, start=1):
        started = time.perf_counter()
        log.info(f"[{i}/{len(runs)}] {variant} seed {seed}")
        result = train_and_evaluate(study, variant, seed)
        log.info(f"[{i}/{len(runs)}] {variant} seed {seed}: pass@1 {result['final/pass@1']:.3f} "
                 f"({time.perf_counter() - started:.0f} s)")
    return report(study)


def report(study: StudyConfig) -> list[dict]:
    """results.json, results.md and study.png from the runs finished so far (a study in progress is reported
    on what it has)."""
    out = Path(study.out_dir)
    results = [r for v in study.variants for s in study.seeds if (r := finished_result(study, v, s)) is not None]
    if not results:
        raise ConfigError(f"{out}: no finished run of this study to report on yet")
    wall = sum(r["time/run_wall"] for r in results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"runs": results, "summary": summarize(results), "wall_s": wall})
    curves = mean_curves(study, results)
    atomic_write_text(out / "results.md", results_markdown(study, results, wall, curves))
    plot_study(study, curves, out / "study.png")
    return results
