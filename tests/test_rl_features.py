"""The switches peer RL stacks have: overlong handling, rollout correction, dynamic sampling, token-budget
micro-batches, wandb. Hand-computed values for the math, then runs of the tiny model."""

import glob
import math
import struct

import pytest
import torch

from soup_megatron.actor.base import TokenBatch, padding_share, plan_micro_batches, with_filler_rows
from soup_megatron.actor.local import LocalActor
from soup_megatron.algo.dynamic_sampling import informative_groups, refill_prompts
from soup_megatron.algo.loss import LossConfig, LossScale, policy_token_loss, zero_loss_rows
from soup_megatron.algo.overlong import overlong_penalty
from soup_megatron.algo.rollout_correction import rollout_correction
from soup_megatron.config import ActorConfig, ConfigError
from soup_megatron.metrics import read_metrics
from soup_megatron.sample import CONTINUATION as C
from soup_megatron.sample import PREFIX as P
from soup_megatron.sample import PROMPT as Q
from soup_megatron.train.stage import Timer
from soup_megatron.train.trainer import Trainer

HALF_CONSTANT = "reward.function=tests.helpers:half_constant_reward"


# ---- overlong ------------------------------------------------------------------------------------
def test_soft_overlong_penalty_by_hand():
    # L_max = 20, L_c = 5: free up to 15 tokens, then -(|y| - 15) / 5, -1 past 20
    assert overlong_penalty(15, 20, 5, 1.0) == 0.0
    assert overlong_penalty(16, 20, 5, 1.0) == pytest.approx(-0.2)
    assert overlong_penalty(18, 20, 5, 0.5) == pytest.approx(-0.3)
    assert overlong_penalty(20, 20, 5, 1.0) == pytest.approx(-1.0)
    assert overlong_penalty(21, 20, 5, 2.0) == -2.0
    assert overlong_penalty(20, 20, 0, 1.0) == 0.0  # off


def test_overlong_filter_zeroes_exactly_the_truncated_responses_loss(make_config):
    plain = Trainer(make_config("trainer.steps=1", out="plain"))
    samples, _ = plain.collector.rollout(0, Timer())
    plain.collector.score(samples)
    plain.close()
    trainer = Trainer(make_config("trainer.steps=1", "algo.overlong_filter=true"))
    filtered, unfiltered = trainer.updater.make_batch(samples), plain.updater.make_batch(samples)
    trainer.close()
    cut = torch.tensor([s.finish_reason == "length" for s in samples])
    assert 0 < int(cut.sum()) < len(samples), "the test needs truncated and finished responses"
    assert (filtered.segment[cut] == Q).all()  # no trained token left in a truncated response
    assert torch.equal(filtered.segment[~cut], unfiltered.segment[~cut])  # the others are untouched
    logp = torch.randn(filtered.behaviour_logp.shape)
    cfg = LossConfig(prefix_mode="clip")
    loss, _ = policy_token_loss(logp, filtered.behaviour_logp, filtered.behaviour_logp, filtered.advantages,
                                filtered.segment, cfg)
    reference, _ = policy_token_loss(logp, unfiltered.behaviour_logp, unfiltered.behaviour_logp,
                                     unfiltered.advantages, unfiltered.segment, cfg)
    assert (loss[cut] == 0).all() and torch.equal(loss[~cut], reference[~cut])
    assert zero_loss_rows(filtered.advantages, filtered.segment, cfg)[cut].all()
    # and they are not counted: the update's weights divide by the other responses' tokens and rows
    assert LossScale.of(filtered.segment, "clip") == LossScale.of(unfiltered.segment[~cut], "clip")


# ---- rollout correction ----------------------------------------------------------------------------
SEG = torch.tensor([[Q, P, P, C, C, C]])
OLD = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.6, 0.2, 0.5]]))  # trainer's pi_old
MU = torch.log(torch.tensor([[0.5, 0.1, 0.9, 0.2, 0.35, 0.5]]))  # the engines' log-probs (history on P)


def test_tis_and_mis_weights_by_hand():
    # continuation ratios w = 0.6/0.2 = 3, 0.2/0.35 = 0.571, 0.5/0.5 = 1; prefix and prompt columns keep 1
    tis = rollout_correction(OLD, MU, SEG, "tis", "token", cap=2.0)
    assert tis[0].tolist() == pytest.approx([1, 1, 1, 2.0, 0.2 / 0.35, 1.0])
    mis = rollout_correction(OLD, MU, SEG, "mis", "token", cap=2.0)  # kept in [0.5, 2]
    assert mis[0].tolist() == pytest.approx([1, 1, 1, 0.0, 1.0, 1.0])
    assert rollout_correction(OLD, MU, SEG, "mis", "token", cap=1.5)[0].tolist() == [1, 1, 1, 0.0, 0.0, 1.0]
    # sequence level: W = 3 * 0.571 * 1 = 1.714 for every continuation token
    w = 3 * 0.2 / 0.35
    assert rollout_correction(OLD, MU, SEG, "tis", "sequence", cap=2.0)[0].tolist() == pytest.approx(
        [1, 1, 1, w, w, w])
    assert rollout_correction(OLD, MU, SEG, "tis", "sequence", cap=1.2)[0, 3:].tolist() == pytest.approx([1.2] * 3)
    assert rollout_correction(OLD, MU, SEG, "mis", "sequence", cap=1.4)[0, 3:].tolist() == [0.0] * 3
    assert rollout_correction(OLD, MU, SEG, "mis", "sequence", cap=2.0)[0, 3:].tolist() == [1.0] * 3
    assert torch.equal(rollout_correction(OLD, MU, SEG, "none"), torch.ones_like(OLD))
    # a long sequence's weight is capped in log space: no overflow to inf
    long_seg = torch.full((1, 400), C)
    huge = rollout_correction(torch.zeros(1, 400), torch.full((1, 400), -1.0), long_seg, "tis", "sequence", 2.0)
    assert torch.isfinite(huge).all() and huge.max() == pytest.approx(2.0)


@pytest.mark.parametrize("prefix_mode", ["clip", "decoupled", "shaped", "mask"])
def test_correction_multiplies_continuation_losses_only(prefix_mode):
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.6, 0.55, 0.3, 0.5]]))
    cfg = LossConfig(prefix_mode=prefix_mode)
    c = rollout_correction(OLD, MU, SEG, "tis", "token", cap=2.0)
    plain, _ = policy_token_loss(logp, OLD, MU, torch.tensor([1.0]), SEG, cfg)
    corrected, _ = policy_token_loss(logp, OLD, MU, torch.tensor([1.0]), SEG, cfg, correction=c)
    assert torch.equal(corrected[0, :3], plain[0, :3])  # prefix tokens: judged against pi_h as before
    assert corrected[0, 3:].tolist() == pytest.approx((plain[0, 3:] * c[0, 3:]).tolist())
    # by hand for the first continuation token: r = 0.55 / 0.6, inside the clip range, times the capped 2.0
    assert corrected[0, 3].item() == pytest.approx(-2.0 * 0.55 / 0.6)


def test_correction_in_a_run_reads_the_engines_logprobs(make_config):
    """An engine that reports log-probs 0.5 too low makes w = e^0.5 = 1.65 on every continuation token: TIS with
    cap 1.5 truncates every one of them, MIS with cap 1.5 masks every one."""
    for mode, key, expected in (("tis", "rollout_correction/weight_mean", 1.5),
                                ("mis", "rollout_correction/masked_frac", 1.0)):
        trainer = Trainer(make_config("trainer.steps=1", "soup.mix_fraction=0", f"algo.rollout_correction={mode}",
                                      "algo.rollout_correction_cap=1.5", out=mode))
        generate = trainer.engine.generate

        def biased(*args, generate=generate):
            gens = generate(*args)
            for g in gens:
                g.logprobs = [lp - 0.5 for lp in g.logprobs]
            return gens

        trainer.engine.generate = biased
        record = trainer.train_step(0)
        trainer.close()
        assert record[key] == pytest.approx(expected, abs=1e-4)


# ---- dynamic sampling ------------------------------------------------------------------------------
def test_informative_groups_and_reproducible_refills():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    assert informative_groups(rewards, 3).tolist() == [False, True, False]
    pool = list(range(50))
    assert refill_prompts(pool, 5, 11) == refill_prompts(pool, 5, 11) != refill_prompts(pool, 5, 12)
    assert len(set(refill_prompts(pool, 5, 11))) == 5 and len(refill_prompts(pool[:3], 5, 11)) == 3


@pytest.mark.parametrize("mode", [["soup.mix_fraction=0"], [], ["soup.prefix_source=replay", "data.train_size=8"]],
                         ids=["grpo", "soup", "replay"])
def test_dynamic_sampling_never_trains_on_an_all_equal_group(make_config, mode):
    cfg = make_config("trainer.steps=3", "trainer.eval_interval=0", "algo.dynamic_sampling=true", HALF_CONSTANT,
                      *mode)
    trainer = Trainer(cfg)
    captured = []
    original = trainer.updater.make_batch
    trainer.updater.make_batch = lambda samples: captured.append(samples) or original(samples)
    trainer.run()
    rows = read_metrics(cfg.trainer.out_dir + "/metrics.jsonl")[1:]
    g = cfg.rollout.group_size
    for samples in captured:
        groups = [samples[i: i + g] for i in range(0, len(samples), g)]
        assert all(len({s.reward for s in group}) > 1 for group in groups)
        assert all(len({s.prompt.uid for s in group}) == 1 for group in groups)
    assert sum(r["dynamic/groups_dropped"] for r in rows) > 0 and sum(r["dynamic/refill_rounds"] for r in rows) > 0
    for r, samples in zip(rows, captured):
        assert r["dynamic/groups_kept"] == len(samples) // g == cfg.rollout.prompts_per_step - r["dynamic/groups_short"]


def test_dynamic_sampling_without_refills_trains_on_what_there_is(make_config):
    cfg = make_config("trainer.steps=2", "trainer.eval_interval=0", "algo.dynamic_sampling=true", HALF_CONSTANT,
                      "algo.dynamic_sampling_max_rounds=0", "algo.minibatches=2")
    trainer = Trainer(cfg)
    trainer.run()
    rows = read_metrics(cfg.trainer.out_dir + "/metrics.jsonl")[1:]
    short = [r for r in rows if r["dynamic/groups_short"] > 0]
    assert short, "the test needs a step with an uninformative group"
    for r in short:
        assert r["dynamic/refill_rounds"] == 0 and r["dynamic/groups_dropped"] == r["dynamic/groups_short"]
        assert r["train/samples_trained"] <= r["dynamic/groups_kept"] * cfg.rollout.group_size


# ---- token-budget micro-batches ---------------------------------------------------------------------
def test_plan_micro_batches_by_token_budget():
    lengths = [5, 30, 12, 29, 6, 13, 40]
    plans = plan_micro_batches(lengths, max_rows=8, max_tokens=60)
    assert sorted(i for p in plans for i in p) == list(range(len(lengths)))
    assert all(len(p) * max(lengths[i] for i in p) <= 60 for p in plans if len(p) > 1)
    assert plans[0] == [6]  # 40 tokens: alone (two rows would cost 80)
    assert plan_micro_batches(lengths, max_rows=3) == [[0, 1, 2], [3, 4], [5, 6]]  # by rows, in order
    assert plan_micro_batches([100], max_rows=4, max_tokens=10) == [[0]]  # over budget: alone
    pad_rows, computed_rows = padding_share(lengths, plan_micro_batches(lengths, max_rows=3))
    pad_tokens, computed_tokens = padding_share(lengths, plans)
    assert computed_rows - pad_rows == computed_tokens - pad_tokens == sum(lengths)
    assert pad_tokens / computed_tokens < pad_rows / computed_rows


def varied_batch(vocab: int, n: int = 10) -> TokenBatch:
    g = torch.Generator().manual_seed(5)
    lengths = [8 + (7 * i) % 23 for i in range(n)]
    width = max(lengths)
    ids = torch.randint(1, vocab, (n, width), generator=g)
    mask = torch.zeros(n, width, dtype=torch.long)
    segment = torch.full((n, width - 1), Q)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
        segment[i, 3: 3 + (length - 4) // 2] = P if i % 2 else C
        segment[i, 3 + (length - 4) // 2: length - 1] = C
    return TokenBatch(ids, mask, segment, torch.randn(n, width - 1, generator=g) - 2.0,
                      torch.zeros(n, width - 1, dtype=torch.long), torch.linspace(-1, 1, n))


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_token_budget_micro_batches_give_the_row_micro_batches_loss_and_gradient(tiny_model, loss_agg):
    actors = {budget: LocalActor(tiny_model, ActorConfig(micro_batch_size=3, max_tokens_per_micro_batch=budget))
              for budget in (0, 50)}
    batch = varied_batch(actors[0].model.config.vocab_size)
    batch.old_logp, _ = actors[0].logprobs(batch, 1.0)
    cfg = LossConfig(loss_agg=loss_agg, entropy_coef=0.01)
    out = {budget: actor.train_minibatch(batch, cfg, 1.0) for budget, actor in actors.items()}
    assert out[0]["loss"] == pytest.approx(out[50]["loss"], rel=1e-5, abs=1e-7)
    for (name, a), b in zip(actors[0].model.named_parameters(), actors[50].model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name
    real = batch.segment.flatten() != Q  # padding columns hold whatever their micro-batch computed
    for key in ("ratio", "entropy"):
        assert torch.allclose(out[0][key][real], out[50][key][real], atol=1e-5)
    share = {budget: o["padded_tokens"] / o["computed_tokens"] for budget, o in out.items()}
    assert share[50] < share[0]


def test_filler_rows_change_no_loss_or_gradient(tiny_model):
    actors = [LocalActor(tiny_model, ActorConfig(micro_batch_size=4)) for _ in range(2)]
    batch = varied_batch(actors[0].model.config.vocab_size, n=5)
    batch.old_logp, _ = actors[0].logprobs(batch, 1.0)
    cfg = LossConfig(kl_coef=0.1)
    batch.ref_logp = batch.old_logp - 0.1
    scale = LossScale.of(batch.segment, cfg.prefix_mode)
    padded = with_filler_rows(batch, 3)
    assert len(padded) == 8 and (padded.segment[5:] == Q).all()
    out = [actors[0].train_minibatch(batch, cfg, 1.0, scale), actors[1].train_minibatch(padded, cfg, 1.0, scale)]
    assert out[0]["loss"] == pytest.approx(out[1]["loss"], rel=1e-6)
    for a, b in zip(actors[0].model.parameters(), actors[1].model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)


# ---- wandb ---------------------------------------------------------------------------------------------
def wandb_history(run_file: str) -> list[dict]:
    """The history rows of a .wandb file (a LevelDB-style log of protobuf records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    pos, chunk, rows = 7, b"", []  # past the file header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, size, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if size == 0 and kind == 0:
            break
        chunk += data[pos + 7: pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_runs_metrics(make_config):
    cfg = make_config("trainer.steps=2", "trainer.eval_interval=0", "trainer.wandb=offline",
                      "trainer.wandb_project=soup-test")
    Trainer(cfg).run()
    files = glob.glob(cfg.trainer.out_dir + "/wandb/offline-run-*/run-*.wandb")
    assert len(files) == 1
    logged = {int(r["_step"]): r for r in wandb_history(files[0])}
    for row in read_metrics(cfg.trainer.out_dir + "/metrics.jsonl"):
        got = logged[row["step"]]
        for key in ("reward_mean", "loss", "heldout/greedy_acc", "time/rollout"):
            if key in row:
                assert math.isclose(float(got[key]), row[key], rel_tol=1e-6), key


# ---- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("algo.rollout_correction=is", "algo.rollout_correction"),
    ("algo.rollout_correction_level=batch", "algo.rollout_correction_level"),
    ("algo.rollout_correction_cap=0.5", "algo.rollout_correction_cap"),
    ("algo.dynamic_sampling_max_rounds=-1", "algo.dynamic_sampling_max_rounds"),
    ("algo.dynamic_sampling=maybe", "algo.dynamic_sampling"),
    ("algo.overlong_filter=sometimes", "algo.overlong_filter"),
    ("algo.overlong_penalty_len=100", "algo.overlong_penalty_len"),
    ("algo.overlong_penalty_factor=-1", "algo.overlong_penalty_factor"),
    ("actor.max_tokens_per_micro_batch=-5", "actor.max_tokens_per_micro_batch"),
    ("trainer.wandb=cloud", "trainer.wandb"),
])
def test_bad_values_of_the_new_keys_are_refused_by_name(make_config, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_config(override)


def test_token_budget_is_refused_with_the_interleaved_schedule(make_config):
    with pytest.raises(ConfigError, match="actor.max_tokens_per_micro_batch.*virtual_pipeline"):
        make_config("actor.backend=megatron", "actor.megatron.pipeline_parallel=2", "actor.megatron.virtual_pipeline=2",
                    "actor.max_tokens_per_micro_batch=512")


# ---- one-step-off rollout ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [["soup.mix_fraction=0"], [], ["reward.type=math_verify"]],
                         ids=["grpo", "soup", "math-verify"])  # math-verify's timeout needs the main thread
def test_one_step_off_keeps_every_token_within_the_bound(make_config, mode):
    cfg = make_config("trainer.steps=4", "trainer.eval_interval=0", "rollout.async_steps=1",
                      "algo.rollout_correction=tis", *mode)
    trainer = Trainer(cfg)
    seen = []
    original = trainer.updater.make_batch

    def capture(samples):  # at the update: the actor's version and the continuation tokens' versions
        seen.append((trainer.actor.version, {v for s in samples for v, seg in zip(s.versions, s.segments) if seg == C}))
        return original(samples)

    trainer.updater.make_batch = capture
    trainer.run()
    rows = read_metrics(cfg.trainer.out_dir + "/metrics.jsonl")[1:]
    assert seen[0] == (0, {0})  # the first step has nothing ahead: collected on the spot
    assert all(versions == {version - 1} for version, versions in seen[1:])  # then always one version old
    assert [r["staleness/max"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    if "reward.type=math_verify" not in mode:  # (the test model earns no math reward: nothing is trained)
        assert all(r["rollout_correction/weight_mean"] > 0 for r in rows)


def test_a_token_older_than_the_bound_is_refused(make_config):
    trainer = Trainer(make_config("trainer.steps=3", "rollout.async_steps=1", "soup.mix_fraction=0"))
    try:
        trainer.train_step(0)
        trainer.train_step(1)
        trainer.actor.version += 1  # as if a step had passed without these samples' rollout being refreshed
        with pytest.raises(RuntimeError, match="written by policy version 1 reached the update of version 3"):
            trainer.train_step(2)
    finally:
        trainer.close()
