"""What the step benchmark compares (experiments/bench.py), under which conditions, and its flags: kept apart
from the benchmark so that the command line can list them without importing the trainer."""

from __future__ import annotations

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
# equal conditions (unless --learning): a frozen policy, so every variant samples the same distribution at
# every step (Adam moves a weight by about lr = 1e-12 a step, which float32 rounds away for every weight
# further than about 1e-5 from zero), and
# every sample trained, so a variant whose groups happened to have equal rewards more often does not skip
# more training passes (a sample with A = 0 and no entropy term has no pass: train/update.py)
FROZEN = ["actor.lr=1e-12"]
EVERY_SAMPLE_TRAINED = ["algo.entropy_coef=1e-12"]


def add_step_arguments(parser) -> None:
    """The step benchmark's own flags (tools/bench_step.py and `soup-megatron bench`)."""
    parser.add_argument("--variant", action="append", metavar="NAME",
                        help="step benchmark: run only these variants besides GRPO (repeat): "
                             + ", ".join(STEP_VARIANTS))
    parser.add_argument("--target-ci", type=float, metavar="HALF_WIDTH",
                        help="step benchmark: after --steps, go on until every step / GRPO interval is at most "
                             "+-HALF_WIDTH (e.g. 0.05), up to --max-steps")
    parser.add_argument("--max-steps", type=int, help="step benchmark: the most steps --target-ci may run "
                                                      "(default 4 x --steps)")
    parser.add_argument("--records", metavar="FILE.json", help="step benchmark: also write every step record there")
    parser.add_argument("--learning", action="store_true",
                        help="step benchmark: let the policy learn (default: frozen and every sample trained, "
                             f"{' '.join(FROZEN + EVERY_SAMPLE_TRAINED)})")


def step_arguments(args) -> dict:
    return {"variants": args.variant, "target_ci": args.target_ci, "max_steps": args.max_steps,
            "learning": args.learning, "records_path": args.records}
