"""One GRPO step against one SOUP step at equal GPU count, per history placement: a model of step time.

Time of one generation call on S servers (each one SGLang engine over tp GPUs):
    decode(longest, D, F, S) = tau0 * longest + tau1 * D / S + F / (prefill_tps * S)
tau0: seconds per decode step of a server (its weights read once per step, plus launch overheads);
tau1: seconds per running sequence per decode step (its KV cache read and its 2N FLOPs per token);
longest: the longest sample (decode steps), D: decoded tokens, F: prefilled tokens (prompt + prefix).
The batch is assumed to fit a server's running-request slots (the recipes' KV pools hold it).

Step (the trainer's phases run one after another; history for later steps is generated ahead):
    GRPO       decode_on(S_all) + train + sync
    dedicated  decode_on(S_policy) + train + sync + max(0, history(S_history) - window)
               the history servers generate while everything else runs: window = the rest of the step
    colocated  decode_on(S_all) + train + sync + max(0, history(S_all) - (train + sync))
               history shares the policy servers' GPUs and yields to the on-policy rollout: it has only the
               training window (the trainer does not implement this placement yet: soup.history_placement
               is planned in issue 14, item 3)
    shared     decode_on + history + train + sync on one pool of cores, one after another (a CPU machine,
               where the history worker and the trainer share the cores: what `bench_step` measures here)
    history(S) = versions * (tau0 * longest_h + load_s) + tau1 * D_h / S + F_h / (prefill_tps * S)
               (the history worker generates one version at a time; with lookahead = 0 history is on the
               critical path and its whole time is added)
    train      = trained tokens * 8 N / (train GPUs * peak FLOP/s * MFU)   (forward + backward 6N, the
               old-log-prob forward 2N; +2N with a reference model, algo.kl_coef > 0)

Tokens of a step (mean field): B prompts of P tokens, G samples each, responses of mean length r * L (L =
rollout.max_response_len, r = --mean-response, the longest sample = L in both algorithms: an unmixed sample can
always run to the budget), n_mix mixed samples per group cut at k = E[lambda] * l_h, l_h the historical
trajectory's mean length (cut_of = history) or k = min(E[lambda] * L, l_h) with l_h = min(r L, cut_max L)
(cut_of = max_length, where history stops at cut_max * L). A mixed sample's response keeps the mean length, so
SOUP decodes B (G r L - n_mix k) on-policy tokens, prefills B n_mix k more, and its history decodes
B * H * l_h (H = soup.history_per_prompt; 0 = n_mix). A group's prompt is prefilled once (requests are routed
to one server per group, the radix cache serves the rest). Trained tokens B G (P + r L) in both.

Default throughput of the H100 recipes, derived from hardware figures and the model's shape:
    H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (NVIDIA H100 Tensor Core GPU datasheet, 2023)
    tau0 = weight bytes / tp / (3.35 TB/s * 0.7) + 1 ms      tau1 = KV bytes per token * (P + L / 2) / tp /
    (3.35 TB/s * 0.7) + 2 N / tp / (989 TFLOP/s * 0.5)        prefill_tps = tp * 989e12 * 0.5 / 2 N
    The 0.7 achieved-bandwidth and 0.5 achieved-FLOP fractions and the 1 ms per-step overhead are assumptions
    (typical of well-tuned inference engines, not measured here); override them with --tau0 / --tau1.
    Train MFU 0.40: Narayanan et al. 2021 (arXiv:2104.04473) report 52% of peak for GPT models with
    Megatron-LM on A100; RL batches of uneven lengths pack worse, hence lower.
    Weight sync: bf16 weights written once and read by every policy server at --disk-gbps (default 5 GB/s:
    a parallel file system, assumed); a history version load reads one checkpoint at the same rate.
    Mixture of experts: N in the weight bytes, sync and loads is the total count (a decode step of a batch
    reads every expert); N in the FLOP terms (tau1, prefill, train) the active count, top-k of E experts.
CPU validation (`--validate RECORDS.json`, from `tools/bench_step.py --records`): tau0, tau1 and prefill_tps are
measured on this machine with the in-process engine, the train and sync terms are read from the GRPO rows,
the tokens from each variant's own rows, and the predicted SOUP / GRPO ratio (shared placement) is printed
beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..algo.mixing import mixed_count
from ..config import Config, load_config
from ..errors import refusals_to_exit_code
from ..mcore.model import padded_vocab_size, read_architecture
from .memory import PlanError, parameter_counts, sglang_budget

H100_BANDWIDTH = 3.35e12  # bytes/s
H100_BF16_FLOPS = 989e12
BANDWIDTH_FRACTION = 0.7
FLOPS_FRACTION = 0.5
STEP_OVERHEAD_S = 1e-3
TRAIN_MFU = 0.40
DISK_GB_PER_S = 5.0  # a parallel file system, as the 70B recipe assumes
PLACEMENTS = ("dedicated", "colocated", "shared")


@dataclass(frozen=True)
class Throughput:
    tau0: float  # s per decode step of one server
    tau1: float  # s per running sequence per decode step
    prefill_tps: float  # prefilled tokens/s of one server
    train_s_per_unit: float  # trainer seconds per trained token (a sample in --validate), all its GPUs
    sync_s: float  # weight sync of one step
    load_s: float  # one history version loaded by the history engines


@dataclass(frozen=True)
class Workload:
    """One step's tokens; the history terms are zero for GRPO."""

    longest: float
    decoded: float
    prefilled: float
    trained: float  # tokens trained (samples trained in --validate, where the rate is per sample)
    history_steps: float = 0.0  # decode steps of the step's history, one call per version: sum of their longest
    history_versions: float = 0.0  # versions the step's history is written by
    history_loads: float = 0.0  # weight loads of the history engines per step
    versions_in_parallel: bool = True  # False: one engine over all history servers, versions one after another
    history_decoded: float = 0.0
    history_prefilled: float = 0.0


def decode_seconds(t: Throughput, longest: float, decoded: float, prefilled: float, servers: int) -> float:
    return t.tau0 * longest + t.tau1 * decoded / servers + prefilled / (t.prefill_tps * servers)


def history_seconds(t: Throughput, w: Workload, servers: int, steps_per_call: int = 1) -> float:
    """The history engines' time per step: versions spread over the servers run in parallel, a call covers
    steps_per_call steps (its longest trajectory paid once), token work splits over the servers."""
    parallel = max(1, min(servers, round(w.history_versions))) if w.versions_in_parallel else 1
    return (t.tau0 * w.history_steps / parallel / steps_per_call + t.tau1 * w.history_decoded / servers
            + w.history_prefilled / (t.prefill_tps * servers) + w.history_loads * t.load_s)


def step_seconds(t: Throughput, w: Workload, placement: str, policy_servers: int, history_servers: int,
                 lookahead: int, steps_per_call: int = 1, history_t: Throughput | None = None) -> float:
    """One step: the rollout on the policy servers, the history on the history servers (colocated: on the
    policy servers' GPUs; shared: on the same pool, in turn); GRPO is a Workload without history."""
    train = w.trained * t.train_s_per_unit
    rollout = decode_seconds(t, w.longest, w.decoded, w.prefilled, policy_servers)
    history = history_seconds(history_t or t, w, history_servers, steps_per_call) if w.history_decoded else 0.0
    if placement == "dedicated":
        rest = rollout + train + t.sync_s
        return rest + (history if lookahead == 0 else max(0.0, history - rest))
    if placement == "colocated":
        return rollout + train + t.sync_s + (history if lookahead == 0 else max(0.0, history - train - t.sync_s))
    if placement == "shared":
        return rollout + history + train + t.sync_s
    raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")


def expected_workload(cfg: Config, prompt_len: float, mean_response: float, history_per_prompt: int,
                      cut_of: str, soup: bool, history_servers: int = 1, steps_per_call: int = 1) -> Workload:
    """Mean-field tokens of one step (see the module docstring)."""
    r, s = cfg.rollout, cfg.soup
    B, G, L = r.prompts_per_step, r.group_size, r.max_response_len
    mean_len = mean_response * L
    trained = B * G * (prompt_len + mean_len)
    if not soup:
        return Workload(longest=L, decoded=B * G * mean_len, prefilled=B * prompt_len, trained=trained)
    n_mix = mixed_count(G, s.mix_fraction)
    n_hist = min(history_per_prompt, n_mix) if history_per_prompt else n_mix
    lam = (s.cut_min + s.cut_max) / 2
    if cut_of == "history":
        hist_len, hist_longest, cut = mean_len, L, lam * mean_len
    else:
        hist_len, hist_longest = min(mean_len, s.cut_max * L), s.cut_max * L
        cut = min(lam * L, hist_len)
    draws = B * n_hist
    keep = cfg.history.keep
    versions = keep * (1 - (1 - 1 / keep) ** draws) if cfg.history.pick == "uniform" else 1.0
    # each server keeps the version it holds: a job loads the versions beyond them, and a new pool member
    # enters every history.interval steps
    loads = max(versions - history_servers, 0.0) / steps_per_call + 1 / cfg.history.interval
    return Workload(longest=L, decoded=B * (G * mean_len - n_mix * cut), prefilled=B * prompt_len + B * n_mix * cut,
                    trained=trained, history_steps=versions * hist_longest, history_versions=versions,
                    history_loads=loads, history_decoded=draws * hist_len, history_prefilled=draws * prompt_len)


def recipe_throughput(cfg: Config, architecture: Path, prompt_len: float, train_gpus: int,
                      disk_gb_per_s: float = DISK_GB_PER_S) -> Throughput:
    """H100 figures for the config's SGLang servers and trainer (see the module docstring)."""
    arch = read_architecture(architecture)
    counts = parameter_counts(arch, padded_vocab_size(arch.vocab_size, cfg.actor.megatron))
    # a MoE model's decode step reads every expert (a batch's tokens hit them all) and syncs them all, but a
    # token computes with its top-k: weights and sync count the total, FLOPs the active parameters
    n, n_active = counts.total, counts.active
    sg = cfg.rollout.sglang
    budget = sglang_budget(arch, n, sg.tp_size, sg.dtype, 0.85, 80 * 2**30)
    bandwidth = sg.tp_size * H100_BANDWIDTH * BANDWIDTH_FRACTION
    flops = sg.tp_size * H100_BF16_FLOPS * FLOPS_FRACTION
    context = prompt_len + cfg.rollout.max_response_len / 2
    weight_bytes = n * budget.bytes_per_value
    kl = 2 if cfg.algo.kl_coef > 0 else 0
    return Throughput(
        tau0=weight_bytes / bandwidth + STEP_OVERHEAD_S,
        tau1=budget.kv_per_token * min(sg.tp_size, arch.num_kv_heads) * context / bandwidth + 2 * n_active / flops,
        prefill_tps=flops / (2 * n_active),
        train_s_per_unit=(8 + kl) * n_active / (train_gpus * H100_BF16_FLOPS * TRAIN_MFU),
        sync_s=2 * n * 2 / (disk_gb_per_s * 1e9),  # written once, read once (servers read in parallel)
        load_s=2 * n / (disk_gb_per_s * 1e9))


def rollout_servers(cfg: Config, dedicated_history: int | None) -> tuple[int, int]:
    """The servers the rollout GPUs hold (every one a policy server under GRPO or colocated history), and
    how many of them are history servers with dedicated placement."""
    sg = cfg.rollout.sglang
    if cfg.soup.history_placement == "colocated":
        total, dedicated = sg.policy_servers, dedicated_history or max(1, sg.policy_servers // 4)
    else:
        total, dedicated = sg.policy_servers + sg.history_servers, dedicated_history or sg.history_servers
    if dedicated >= total:
        raise PlanError(f"--history-servers {dedicated}: the rollout GPUs hold {total} servers; a dedicated "
                        "placement needs at least one of them for the policy")
    return total, dedicated


def plan_table(cfg: Config, t: Throughput, prompt_len: float, mean_response: float, title: str,
               dedicated_history: int | None = None) -> Table:
    total, dedicated = rollout_servers(cfg, dedicated_history)
    grpo = expected_workload(cfg, prompt_len, mean_response, 0, "history", soup=False)
    grpo_s = step_seconds(t, grpo, "colocated", total, 0, cfg.soup.lookahead)
    table = Table(title=title, caption="* one trajectory per mixed sample, one engine over all history servers "
                                       "generating the versions one after another, each reloaded every step")
    for column in ("variant", "placement", "step s", "rollout s", "history s", "train s", "sync s", "step / GRPO"):
        table.add_column(column)
    table.add_row("GRPO", f"{total} policy servers", f"{grpo_s:.1f}",
                  f"{decode_seconds(t, grpo.longest, grpo.decoded, grpo.prefilled, total):.1f}", "-",
                  f"{grpo.trained * t.train_s_per_unit:.1f}", f"{t.sync_s:.1f}", "1.000")
    per_call = max(cfg.soup.lookahead, 1)
    variants = [("SOUP before issue 14*", 0, "history", 1),
                ("SOUP history per sample", 0, "history", 1), ("SOUP history_per_prompt=1", 1, "history", 1),
                (f"SOUP 1 + steps_per_call={per_call}", 1, "history", per_call),
                ("SOUP 1 + cut_of=max_length", 1, "max_length", 1),
                (f"SOUP 1 + max_length + steps_per_call={per_call}", 1, "max_length", per_call)]
    for name, per_prompt, cut_of, steps_per_call in variants:
        for placement in ("dedicated",) if name.endswith("*") else ("dedicated", "colocated"):
            policy = total - dedicated if placement == "dedicated" else total
            hist = dedicated if placement == "dedicated" else total
            w = expected_workload(cfg, prompt_len, mean_response, per_prompt, cut_of, soup=True,
                                  history_servers=hist, steps_per_call=steps_per_call)
            if name.endswith("*"):  # the worker reloaded every version of every step, one after another
                w = replace(w, history_loads=w.history_versions, versions_in_parallel=False)
            s = step_seconds(t, w, placement, policy, hist, cfg.soup.lookahead, steps_per_call)
            table.add_row(name, f"{placement} ({policy} policy, {hist} history)", f"{s:.1f}",
                          f"{decode_seconds(t, w.longest, w.decoded, w.prefilled, policy):.1f}",
                          f"{history_seconds(t, w, hist, steps_per_call):.1f}",
                          f"{w.trained * t.train_s_per_unit:.1f}", f"{t.sync_s:.1f}", f"{s / grpo_s:.3f}")
    return table


# ---- CPU validation ----------------------------------------------------------------------------------------
def calibrate_cpu(cfg: Config, threads: int = 0, reps: int = 2) -> tuple[Throughput, list[tuple[float, ...]]]:
    """tau0, tau1 and prefill tokens/s of the in-process engine on this machine with `threads` torch threads
    (0: torch's default): generation calls of several batch sizes, budgets and prefix lengths, fitted by
    least squares to t = tau0 S + tau1 D + F / prefill_tps."""
    import torch

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        return _calibrate(cfg, reps)
    finally:
        torch.set_num_threads(default_threads)


def _calibrate(cfg: Config, reps: int) -> tuple[Throughput, list[tuple[float, ...]]]:
    import torch

    from ..data.encoding import PromptFormat
    from ..data.prompts import load_splits, prompts_for_step
    from ..model.hf import load_tokenizer
    from ..rollout.base import GenerationRequest
    from ..train.runtime import in_process_engine

    r = cfg.rollout
    fmt = PromptFormat.of(load_tokenizer(cfg.model.path), cfg.data, cfg.model.path)
    prompts = [fmt.prompt_ids(p.text) for p in prompts_for_step(load_splits(cfg.data, cfg.seed)[0], 0,
                                                                     r.prompts_per_step, cfg.seed)]
    engine = in_process_engine(r, cfg.model.path)
    n, L = r.prompts_per_step * r.group_size, r.max_response_len
    filler = engine.generate([GenerationRequest(prompts[0], (), L)], r.temperature, 0)[0].token_ids[: L // 2]
    shapes = [(1, L, 0), (n // 4, L, 0), (n, L, 0), (n, L // 4, 0), (n, 1, len(filler)), (n // 2, L // 2, len(filler))]
    rows = []
    for rep in range(reps):
        for b, budget, prefix in shapes:
            reqs = [GenerationRequest(prompts[i % len(prompts)], tuple(filler[:prefix]), budget) for i in range(b)]
            started = time.perf_counter()
            gens = engine.generate(reqs, r.temperature, 100 + rep)
            seconds = time.perf_counter() - started
            steps = max(len(g.token_ids) for g in gens)
            rows.append((float(steps), float(sum(len(g.token_ids) for g in gens)),
                         float(sum(len(q.prompt_ids) + len(q.prefix_ids) for q in reqs)), seconds))
    started = time.perf_counter()
    engine.load_weights(Path(cfg.model.path), 1)
    load_s = time.perf_counter() - started
    engine.close()
    x = torch.tensor([row[:3] for row in rows], dtype=torch.float64)
    y = torch.tensor([row[3] for row in rows], dtype=torch.float64)
    tau0, tau1, per_prefill = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
    return Throughput(tau0=tau0, tau1=tau1, prefill_tps=1 / per_prefill if per_prefill > 0 else float("inf"),
                      train_s_per_unit=0.0, sync_s=0.0, load_s=load_s), rows


def _median(records: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in records)


def validate(records_path: Path, cfg: Config) -> list[Table]:
    data = json.loads(records_path.read_text())
    warmup, runs = data["warmup"], {name: recs[data["warmup"]:] for name, recs in data["records"].items()}
    if "GRPO" not in runs:
        raise PlanError(f"{records_path}: no GRPO rows (written by tools/bench_step.py --records?)")
    unrecorded = sorted(set(runs) - set(data.get("variants", {})))
    if unrecorded:
        raise PlanError(f"{records_path}: no overrides recorded for variants {unrecorded} (write it again with "
                        "tools/bench_step.py --records)")
    t, rows = calibrate_cpu(cfg)  # the trainer's engine, torch's default threads
    t_history, _ = calibrate_cpu(cfg, cfg.rollout.threads)  # the history worker's engine, rollout.threads
    fit = Table(title=f"CPU calibration ({cfg.model.path}, in-process engine): t = tau0 S + tau1 D + F / prefill")
    for column in ("decode steps S", "decoded D", "prefilled F", "measured s", "fitted s"):
        fit.add_column(column)
    for s_, d, f, seconds in rows:
        fit.add_row(f"{s_:.0f}", f"{d:.0f}", f"{f:.0f}", f"{seconds:.3f}",
                    f"{t.tau0 * s_ + t.tau1 * d + f / t.prefill_tps:.3f}")
    fit.caption = (f"tau0 {t.tau0 * 1e3:.2f} ms, tau1 {t.tau1 * 1e3:.3f} ms, prefill {t.prefill_tps:.0f} tokens/s, "
                   f"version load {t.load_s:.2f} s; the history worker ({cfg.rollout.threads or 'default'} "
                   f"threads): tau0 {t_history.tau0 * 1e3:.2f} ms, tau1 {t_history.tau1 * 1e3:.3f} ms, prefill "
                   f"{t_history.prefill_tps:.0f} tokens/s")
    grpo = runs["GRPO"]
    train_per_sample = _median(grpo, "time/train") / max(_median(grpo, "train/samples_trained"), 1.0)
    overhead = _median(grpo, "time/step") - _median(grpo, "time/rollout") - _median(grpo, "time/train")
    table = Table(title=f"step-time model against {records_path.name} (medians after {warmup} warm-up steps), "
                        "placement shared (one CPU pool)")
    for column in ("variant", "measured step s", "predicted step s", "measured / GRPO", "predicted / GRPO",
                   "ratio error"):
        table.add_column(column)
    predicted_grpo = None
    for name, recs in runs.items():
        w = Workload(longest=_median(recs, "tokens/decode_steps"), decoded=_median(recs, "tokens/decoded"),
                     prefilled=_median(recs, "tokens/prefilled"), trained=_median(recs, "train/samples_trained"),
                     history_steps=_median(recs, "tokens/history_decode_steps"),
                     history_versions=_median(recs, "history/versions_generated"),
                     history_loads=_median(recs, "history/weight_loads"),
                     history_decoded=_median(recs, "tokens/history_decoded"),
                     history_prefilled=_median(recs, "tokens/history_prefilled"))
        soup = load_config(data["config"], [*data["overrides"], *data["variants"][name]]).soup
        calibrated = replace(t, train_s_per_unit=train_per_sample, sync_s=overhead)
        predicted = step_seconds(calibrated, w, "shared", 1, 1, soup.lookahead, soup.history_steps_per_call,
                                 history_t=t_history)
        predicted_grpo = predicted if name == "GRPO" else predicted_grpo
        measured = _median(recs, "time/step")
        m_ratio, p_ratio = measured / _median(grpo, "time/step"), predicted / predicted_grpo
        table.add_row(name, f"{measured:.2f}", f"{predicted:.2f}", f"{m_ratio:.3f}", f"{p_ratio:.3f}",
                      f"{p_ratio / m_ratio - 1:+.1%}")
    table.caption = ("train: GRPO's seconds per trained sample x each variant's samples trained; the rest of GRPO's "
                     "step (weight sync, history save, scoring) is added to every variant")
    return [fit, table]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="plan_step_time.py", description=__doc__.splitlines()[0],
                                     epilog="formulas, defaults and their sources: soup_megatron/planning/step_time.py")
    parser.add_argument("--config", required=True, help="run configuration (YAML)")
    parser.add_argument("--architecture", type=Path, help="HF config.json (default: <model.path>/config.json)")
    parser.add_argument("--prompt-len", type=float, default=200.0, help="mean prompt tokens (default 200)")
    parser.add_argument("--mean-response", type=float, default=0.5,
                        help="mean response length as a fraction of rollout.max_response_len (default 0.5)")
    parser.add_argument("--train-gpus", type=int, help="GPUs training (default: launch ranks x nodes)")
    parser.add_argument("--disk-gbps", type=float, default=DISK_GB_PER_S,
                        help=f"shared file system GB/s for weight sync and history loads (default {DISK_GB_PER_S:g})")
    parser.add_argument("--tau0", type=float, help="seconds per decode step of a server (default: H100 estimate)")
    parser.add_argument("--tau1", type=float, help="seconds per sequence per decode step (default: H100 estimate)")
    parser.add_argument("--history-servers", type=int,
                        help="history servers of the dedicated placement, taken from the rollout GPUs (default: the "
                             "config's, or a quarter of the servers when its history is colocated)")
    parser.add_argument("--validate", type=Path, metavar="RECORDS.json",
                        help="compare with a tools/bench_step.py --records run on this machine instead")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return refusals_to_exit_code(lambda: _plan(args))


def _plan(args) -> int:
    if not 0 < args.mean_response <= 1:
        raise PlanError(f"--mean-response {args.mean_response}: expected a fraction in (0, 1]")
    for flag, value in (("--prompt-len", args.prompt_len), ("--disk-gbps", args.disk_gbps),
                        ("--train-gpus", args.train_gpus), ("--tau0", args.tau0), ("--tau1", args.tau1),
                        ("--history-servers", args.history_servers)):
        if value is not None and value <= 0:
            raise PlanError(f"{flag} {value}: expected a number > 0")
    if args.validate:
        if not args.validate.is_file():
            raise PlanError(f"--validate {args.validate}: no such file (write it with tools/bench_step.py "
                            "--records FILE)")
        data = json.loads(args.validate.read_text())
        cfg = load_config(data["config"], [*data["overrides"], *args.overrides])
        tables = validate(args.validate, cfg)
    else:
        cfg = load_config(args.config, args.overrides)
        launch = cfg.launch
        train_gpus = args.train_gpus or launch.ranks_per_node * max(
            1, launch.slurm.nodes - launch.slurm.rollout_nodes)
        t = recipe_throughput(cfg, args.architecture or Path(cfg.model.path) / "config.json", args.prompt_len,
                              train_gpus, args.disk_gbps)
        t = replace(t, tau0=args.tau0 or t.tau0, tau1=args.tau1 or t.tau1)
        total, _ = rollout_servers(cfg, args.history_servers)
        title = (f"{args.config}: {cfg.rollout.prompts_per_step}x{cfg.rollout.group_size} samples, L="
                 f"{cfg.rollout.max_response_len}, mean response {args.mean_response:g} L, "
                 f"{train_gpus} train GPUs, rollout GPUs for {total} servers x TP{cfg.rollout.sglang.tp_size}")
        table = plan_table(cfg, t, args.prompt_len, args.mean_response, title, args.history_servers)
        table.caption += (f"; tau0 {t.tau0 * 1e3:.2f} ms, tau1 {t.tau1 * 1e6:.1f} us, prefill "
                         f"{t.prefill_tps:.0f} tokens/s per server, train {1 / t.train_s_per_unit:.0f} tokens/s, "
                         f"sync {t.sync_s:.1f} s, version load {t.load_s:.1f} s")
        tables = [table]
    for table in tables:
        Console(width=180).print(table)
    return 0
