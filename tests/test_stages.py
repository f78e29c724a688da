"""The trainer's stages as units, built without a Trainer: collect (train/collect.py), update (train/update.py),
trainer checkpoints (train/checkpointing.py)."""

import pytest
import torch

from soup_megatron.actor import build_actor
from soup_megatron.data.encoding import PromptFormat
from soup_megatron.data.prompts import load_splits
from soup_megatron.history.base import NoPrefixes
from soup_megatron.history.replay import ReplayBuffer
from soup_megatron.history.store import CheckpointStore
from soup_megatron.model.hf import CheckpointError, load_tokenizer, pad_token_id
from soup_megatron.reward import build_reward
from soup_megatron.rollout import build_engine
from soup_megatron.sample import CONTINUATION
from soup_megatron.train.checkpointing import TrainerCheckpoints
from soup_megatron.train.collect import Collected, Collector, StepPrompts
from soup_megatron.train.stage import Timer
from soup_megatron.train.update import Updater


def step_prompts(cfg, n_hist=0):
    tok = load_tokenizer(cfg.model.path)
    return StepPrompts(cfg, load_splits(cfg.data, cfg.seed)[0], PromptFormat.of(tok, cfg.data, cfg.model.path), n_hist)


def grpo_collector(cfg):
    return Collector(cfg, step_prompts(cfg), build_engine(cfg.rollout, cfg.model.path), NoPrefixes(),
                     build_reward(cfg.reward), 0, frozenset())


def test_step_prompts_plan_n_hist_slots_per_prompt_in_prompt_order(make_config):
    cfg = make_config()
    prompts = step_prompts(cfg, n_hist=3)
    slots = prompts.history_slots(2)
    assert [uid for uid, _ in slots] == [p.uid for p in prompts.of_step(2) for _ in range(3)]
    assert all(ids == prompts.ids(p) for (_, ids), p in zip(slots[::3], prompts.of_step(2)))
    assert prompts.of_step(2) == prompts.of_step(2) and prompts.of_step(2) != prompts.of_step(3)


def test_collector_scores_groups_and_hands_over_the_rollout_collected_ahead(make_config):
    """Synchronous: each step's groups, written on-policy by the engine's version, rewarded and given group
    advantages. One-step-off: the next step's rollout is collected while the step "trains", and taken next."""
    cfg = make_config("soup.mix_fraction=0", "rollout.async_steps=1", "trainer.steps=3")
    collector = grpo_collector(cfg)
    try:
        timer = Timer()
        first = collector.take(0, timer)
        assert first.step == 0 and "rollout_wait" in timer.seconds  # nothing was ahead at the start
        samples, generated, info = collector.score_and_select(first, timer)
        g = cfg.rollout.group_size
        assert len(samples) == len(generated) == cfg.rollout.prompts_per_step * g and not any(s.mixed for s in samples)
        assert all(set(s.segments) == {CONTINUATION} and set(s.versions) == {0} for s in samples)
        for i in range(cfg.rollout.prompts_per_step):
            group = torch.tensor([s.advantage for s in samples[i * g: (i + 1) * g]])
            assert abs(float(group.sum())) < 1e-4  # advantages are centred within the group
        assert info["reward_mean"] == pytest.approx(sum(s.reward for s in samples) / len(samples))
        collector.start_ahead(0)
        collector.finish_ahead(timer)
        assert collector.ahead is not None and collector.ahead.step == 1
        ahead = collector.ahead
        assert collector.take(1, Timer()) is ahead and collector.ahead is None
        collector.start_ahead(2)  # the last step: nothing after it to collect
        assert collector.next_rollout is None
    finally:
        collector.close()


def test_updater_trains_the_selected_samples_and_bounds_their_staleness(make_config):
    cfg = make_config("soup.mix_fraction=0")
    collector = grpo_collector(cfg)
    actor = build_actor(cfg.actor, cfg.model.path)
    updater = Updater(cfg, actor, pad_token_id(load_tokenizer(cfg.model.path)))
    try:
        collected = collector.take(0, Timer())
        samples, _, _ = collector.score_and_select(collected, Timer())
    finally:
        collector.close()
    stats = updater.train([], 4, Timer())  # dynamic sampling left nothing: no pass, the version moves on
    assert actor.version == 5 and stats["train/samples_trained"] == 0.0 and stats["overlong/truncated"] == 0.0
    actor.version = 0
    timer = Timer()
    stats = updater.train(samples, 0, timer)
    assert actor.version == 1 and "train" in timer.seconds
    assert stats["staleness/max"] == 0.0 and stats["train/samples_trained"] > 0 and stats["logp_gap/max"] < 1e-4
    assert stats["overlong/truncated"] == sum(s.finish_reason == "length" for s in samples)
    # a clipped token's ratio is out of its range: the clipped share is at most the out-of-range share
    assert stats["continuation/clip_frac"] <= stats["continuation/ratio_out_frac"] <= 1.0
    assert 0.0 <= stats["continuation/clip_adv_mass"] <= 1.0
    actor.version = 2  # these samples were written by version 0: two versions old, past rollout.async_steps=0
    with pytest.raises(RuntimeError, match="written by policy version 0 reached the update of version 2"):
        updater.train(samples, 2, Timer())


def test_trainer_checkpoints_keep_the_newest_and_the_history_they_need(make_config, tmp_path):
    cfg = make_config()
    actor = build_actor(cfg.actor, cfg.model.path)
    store = CheckpointStore(tmp_path / "history", keep=1)
    replay = ReplayBuffer(lambda step: [], per_prompt=2, seed=0)
    checkpoints = TrainerCheckpoints(tmp_path / "checkpoints", keep=2)
    assert checkpoints.latest() is None
    ahead = Collected(step=3, samples=[], info={"tokens/decoded": 5.0}, seconds={})
    for step in (1, 2, 3):
        store.add(step, actor.save_hf)  # keep=1: each add retires the member before it
        actor.version = step
        checkpoints.save(step, actor, store, replay, ahead if step == 3 else None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    assert checkpoints.latest() == tmp_path / "checkpoints" / "step_000003"
    assert store.on_disk() == [2, 3]  # version 2 left the pool, but checkpoint 2 resumes with it
    actor.version = 99
    fresh_store = CheckpointStore(tmp_path / "history", keep=1)
    resumed = checkpoints.load(checkpoints.latest(), actor, fresh_store)
    assert (resumed.step, actor.version, fresh_store.members()) == (3, 3, [3])
    assert resumed.prefixes == replay.state() and resumed.ahead == ahead
    (tmp_path / "checkpoints" / "latest").write_text("step_000007\n")
    with pytest.raises(CheckpointError, match="names step_000007, but .* is missing or incomplete"):
        checkpoints.load(checkpoints.latest(), actor, fresh_store)
