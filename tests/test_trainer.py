"""End-to-end training steps on the tiny model: every mode, provenance, checkpoints, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from soup_megatron.metrics import read_metrics
from soup_megatron.model.hf import CheckpointError, read_state_dict
from soup_megatron.sample import CONTINUATION, PREFIX
from soup_megatron.train.stage import Timer
from soup_megatron.train.trainer import Trainer

from .helpers import alive, child_pids, wait_until

MODES = {
    "soup-default": [],
    "grpo": ["soup.mix_fraction=0"],
    "trajectory": ["soup.mode=trajectory"],
    "replay": ["soup.prefix_source=replay", "data.train_size=8"],
    "decoupled-kl": ["soup.prefix_mode=decoupled", "algo.kl_coef=0.05",
                          "algo.entropy_coef=0.01"],
    "shaped": ["soup.prefix_mode=shaped", "algo.loss_agg=seq_mean_token_mean", "algo.epochs=2"],
    "history-per-sample": ["soup.history_per_prompt=0"],
    "cut-of-max-length": ["soup.cut_of=max_length", "soup.cut_max=0.5"],
    "mask-line-nolookahead": ["soup.prefix_mode=mask", "soup.cut_at=line", "algo.loss_agg=seq_mean_token_sum",
                              "soup.lookahead=0",
                         "history.pick=oldest", "algo.adv_norm=none"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_train_with_provenance(make_config, mode):
    cfg = make_config("trainer.steps=3", "trainer.eval_interval=0", *MODES[mode])
    trainer = Trainer(cfg)
    captured = []
    original = trainer.updater.make_batch
    trainer.updater.make_batch = lambda samples: captured.append(samples) or original(samples)
    summary = trainer.run()
    rows = read_metrics(cfg.trainer.out_dir + "/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "heldout/greedy_acc" in rows[0] and "heldout/greedy_acc" in rows[-1]
    assert summary["final"] == {k: rows[-1][k] for k in summary["final"]}
    for r in rows[1:]:
        for key in ("reward_mean", "time/rollout", "time/prefix_wait", "time/train", "time/weight_sync",
                    "time/history", "continuation/entropy", "loss"):
            assert key in r, key
    g = cfg.rollout.group_size
    n_mix = 0 if mode == "grpo" else g // 2
    for samples in captured:
        assert len(samples) == cfg.rollout.prompts_per_step * g
        for i, s in enumerate(samples):
            assert len(s.response_ids) == len(s.behaviour_logp) == len(s.versions) == len(s.segments)
            assert len(s.response_ids) <= cfg.rollout.max_response_len
            assert s.segments == [PREFIX] * s.cut + [CONTINUATION] * (len(s.response_ids) - s.cut)
            if i % g >= n_mix or not s.mixed:
                assert s.cut == 0
            if mode == "trajectory" and s.mixed:
                assert s.cut == len(s.response_ids)  # every token off-policy
    steps_versions = [{v for s in samples for v, seg in zip(s.versions, s.segments) if seg == CONTINUATION}
                      for samples in captured]
    assert steps_versions[0] <= {0} and steps_versions[2] <= {2}  # continuations come from the current policy
    if mode == "grpo":
        assert all(s.cut == 0 and not s.mixed for samples in captured for s in samples)
        assert "prefix/ratio_mean" not in rows[-1]
    if mode in ("soup-default", "decoupled-kl", "shaped", "history-per-sample", "cut-of-max-length"):
        assert any("prefix/ratio_mean" in r for r in rows[1:])
        prefix_versions = {v for samples in captured for s in samples for v, seg in zip(s.versions, s.segments)
                           if seg == PREFIX}
        assert prefix_versions <= {0, 2}  # historical checkpoints only (history.interval=2)
    if mode == "replay":
        assert rows[1]["mix/replay_misses"] == n_mix * cfg.rollout.prompts_per_step  # nothing seen yet
        assert rows[3]["mix/replay_misses"] < rows[1]["mix/replay_misses"]
    hist = sorted(p.name for p in (trainer.out / "history").iterdir() if p.name.startswith("v"))
    assert hist[-1] == "v000002"


@pytest.mark.parametrize("per_prompt", [1, 2, 0])
def test_mixed_samples_share_history_trajectories_with_independent_cuts(make_config, per_prompt):
    """soup.history_per_prompt = H: a group's mixed samples are cut from H historical trajectories of the
    prompt (0: one each), mixed sample j from trajectory j mod H, each at its own cut, with that trajectory's
    tokens and behaviour log-probs; the history engines decode H trajectories per prompt, no more."""
    cfg = make_config("trainer.steps=0", "soup.lookahead=0", "rollout.group_size=6", "soup.mix_fraction=0.67",
                      "soup.cut_min=0.1", "soup.cut_max=0.9", f"soup.history_per_prompt={per_prompt}")
    trainer = Trainer(cfg)
    n_mix, n_hist = 4, per_prompt or 4
    taken = []
    take = trainer.prefixes.take
    trainer.prefixes.take = lambda step: taken.append(take(step)) or taken[-1]
    cuts = []
    for step in range(2):
        samples, info = trainer.collector.rollout(step, Timer())
        history = taken[-1]
        assert len(history) == cfg.rollout.prompts_per_step * n_hist
        assert info["tokens/history_decoded"] == sum(len(t.token_ids) for t in history)
        for i in range(cfg.rollout.prompts_per_step):
            group = samples[i * 6: (i + 1) * 6]
            assert [s.mixed for s in group] == [True] * n_mix + [False] * 2
            for j, s in enumerate(group[:n_mix]):
                traj = history[i * n_hist + j % n_hist]
                assert s.response_ids[: s.cut] == traj.token_ids[: s.cut]
                assert s.behaviour_logp[: s.cut] == traj.logprobs[: s.cut]
                assert s.versions[: s.cut] == traj.versions[: s.cut]
                cuts.append((step, i, j % n_hist, s.cut))
    # independent cuts: samples sharing a trajectory do not all get the same k
    by_traj = {}
    for step, i, t, k in cuts:
        by_traj.setdefault((step, i, t), []).append(k)
    shared = [ks for ks in by_traj.values() if len(ks) > 1]
    assert (not shared) == (n_hist == n_mix)
    assert not shared or any(len(set(ks)) > 1 for ks in shared)
    trainer.close()


def test_cut_of_max_length_stops_history_at_the_furthest_cut(make_config):
    """soup.cut_of=max_length: history is generated up to floor(cut_max * max_response_len) tokens, every cut
    lies within it and before the historical EOS, and a sample cut at the end of a shortened trajectory still
    gets its continuation (its response budget is not spent)."""
    cfg = make_config("trainer.steps=0", "soup.lookahead=0", "soup.cut_of=max_length", "soup.cut_min=0.5",
                      "soup.cut_max=0.5", "rollout.max_response_len=24")
    trainer = Trainer(cfg)
    taken = []
    take = trainer.prefixes.take
    trainer.prefixes.take = lambda step: taken.append(take(step)) or taken[-1]
    samples, _ = trainer.collector.rollout(0, Timer())
    history = taken[0]
    assert all(len(t.token_ids) <= 12 for t in history)
    assert any(not t.finished for t in history), "every trajectory ended early: the cap was never exercised"
    n_mix = trainer.n_mix
    for i, s in enumerate(s for s in samples if s.mixed):
        traj = history[i // n_mix]
        assert s.cut == min(12, len(traj.token_ids) - traj.finished)
        if not traj.finished:  # cut at its very end: the continuation picks up from there
            assert len(s.response_ids) > s.cut or s.finish_reason == "stop"
    trainer.close()


def test_chat_template_prompt_ids_in_training_prefixes_and_evaluation(tiny_chat_model, make_config):
    """With data.chat_template every prompt the rollout engine, the history worker's plan and the held-out
    evaluation see is exactly apply_chat_template's output."""
    from soup_megatron.model.hf import load_tokenizer

    cfg = make_config(f"model.path={tiny_chat_model}", "data.chat_template=true", "data.system_prompt=Add.",
                      "trainer.steps=1", "trainer.eval_interval=0")
    tok = load_tokenizer(tiny_chat_model)
    trainer = Trainer(cfg)
    expected = {tuple(tok.apply_chat_template([{"role": "system", "content": "Add."},
                                               {"role": "user", "content": p.text}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False))
                for p in trainer.train_prompts + trainer.heldout}
    seen = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda reqs, *args: seen.extend(reqs) or generate(reqs, *args)
    assert {ids for _, ids in trainer.prompts.history_slots(1)} <= expected
    trainer.run()
    evaluation = cfg.data.heldout_size * (1 + cfg.trainer.eval_pass_samples)  # at the start and at the end
    assert len(seen) == cfg.rollout.prompts_per_step * cfg.rollout.group_size + 2 * evaluation
    assert {r.prompt_ids for r in seen} <= expected
    assert len({r.prompt_ids for r in seen[:evaluation]}) == cfg.data.heldout_size


def test_samples_with_zero_advantage_get_no_pass_and_change_nothing(make_config):
    """Groups whose rewards were all equal have advantage 0, so their loss is zero: the trainer does not run
    them, and the update (whose loss weights still count them) equals training every sample."""
    from soup_megatron.actor import build_actor
    from soup_megatron.train.stage import step_seed

    cfg = make_config("trainer.steps=0", "algo.minibatches=2", "soup.lookahead=0")
    trainer = Trainer(cfg)
    samples, _ = trainer.collector.rollout(0, Timer())
    trainer.collector.score(samples)
    batch = trainer.updater.make_batch(samples)
    g = cfg.rollout.group_size
    batch.advantages[: 2 * g] = 0.0  # two of the four groups
    reference = build_actor(cfg.actor, cfg.model.path)
    full = trainer.updater.make_batch(samples)
    full.advantages = batch.advantages.clone()
    full.old_logp, _ = reference.logprobs(full, cfg.rollout.temperature)
    ran = []
    train = trainer.actor.train_minibatch
    trainer.actor.train_minibatch = lambda mb, *args: ran.append(len(mb)) or train(mb, *args)
    stats = trainer.updater.update(batch, 0, Timer())
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(step_seed(cfg.seed, 0, "minibatch")))
    size = len(full) // 2
    for m in range(2):
        reference.train_minibatch(full.select(order[m * size: (m + 1) * size]), trainer.updater.loss_cfg,
                                  cfg.rollout.temperature)
    assert sum(ran) == len(full) - 2 * g and stats["train/zero_loss_samples"] == 2 * g
    assert stats["train/samples_trained"] == len(full) - 2 * g and stats["train/updates_skipped"] == 0
    for (name, p), q in zip(trainer.actor.model.named_parameters(), reference.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    before = {k: v.clone() for k, v in trainer.actor.model.state_dict().items()}
    batch.advantages[:] = 0.0  # nothing to learn: no pass, no optimizer step (Adam's momentum would move weights)
    ran.clear()
    stats = trainer.updater.update(batch, 1, Timer())
    assert ran == [] and stats["train/updates_skipped"] == 2 and "logp_gap/mean" not in stats
    assert all(torch.equal(v, trainer.actor.model.state_dict()[k]) for k, v in before.items())
    trainer.close()


def test_logp_gap_compares_the_engines_logprobs_with_the_actors(make_config):
    """The train/rollout monitor reads the rollout engine's log-probs of the continuation tokens and the
    actor's recomputation: an engine that reports every log-prob 0.01 too high shows as a 0.01 gap."""
    trainer = Trainer(make_config("trainer.steps=1", "trainer.eval_interval=0", "soup.mix_fraction=0"))
    generate = trainer.engine.generate

    def biased(*args):
        gens = generate(*args)
        for g in gens:
            g.logprobs = [lp + 0.01 for lp in g.logprobs]
        return gens

    trainer.engine.generate = biased
    record = trainer.train_step(0)
    trainer.close()
    assert abs(record["logp_gap/mean"] - 0.01) < 1e-4 and record["logp_gap/max"] < 0.0101
    assert 0 < record["logp_gap/tokens"] <= record["tokens/decoded"]  # GRPO: every response token was decoded


def test_history_rotation_in_a_run(make_config):
    cfg = make_config("trainer.steps=6", "trainer.eval_interval=0", "history.interval=1", "history.keep=2",
                      "trainer.save_interval=3", "soup.lookahead=1")
    trainer = Trainer(cfg)
    trainer.run()
    manifest = json.loads((trainer.out / "history" / "manifest.json").read_text())
    assert manifest["members"] == [5, 6]
    assert not (trainer.out / "history" / "v000000").exists()


def test_resuming_twice_from_one_checkpoint(make_config):
    """Prefix jobs pending at a checkpoint may read a version that has left the pool: every resume
    from that checkpoint needs it, not just the first one."""
    args = ["trainer.save_interval=4", "history.interval=1", "history.keep=1", "soup.lookahead=2",
            "trainer.eval_interval=0"]
    Trainer(make_config("trainer.steps=4", *args)).run()
    for _ in range(2):  # resume, train two steps, die before the next checkpoint; twice
        trainer = Trainer(make_config("trainer.steps=8", *args))
        assert trainer.start_step == 4
        trainer.train_step(4)
        trainer.train_step(5)
        trainer.close()


def test_resume_with_changed_config_says_what_changed(make_config, capsys):
    Trainer(make_config("trainer.steps=1", "soup.mix_fraction=0")).run()
    capsys.readouterr()
    trainer = Trainer(make_config("trainer.steps=2", "soup.mix_fraction=0", "algo.clip_high=0.3",
                                  "launch.slurm.partition=other"))
    trainer.close()
    err = capsys.readouterr().err
    assert "changed config: algo.clip_high: 0.2 -> 0.3" in err and "trainer.steps: 1 -> 2" in err
    assert "launch." not in err  # cluster settings are not part of what a resume continues


def test_keys_added_since_a_run_was_saved_count_as_their_defaults(make_config, tmp_path):
    """A run saved before a config key existed resumes under code that has it: the key's default is the
    behaviour the run had, so it is no change; a value other than the default is one."""
    import yaml

    from soup_megatron.config import changed_keys, to_container

    cfg = make_config()
    saved = to_container(cfg)
    del saved["actor"]["routing_replay"], saved["data"]["problems_seed"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert changed_keys(path, cfg) == []
    assert changed_keys(path, make_config("actor.routing_replay=recorded")) == \
        ["actor.routing_replay: 'none' -> 'recorded'"]


def test_missing_checkpoint_is_a_clear_error(make_config):
    cfg = make_config("trainer.steps=2", "trainer.save_interval=1", "soup.mix_fraction=0")
    Trainer(cfg).run()
    import shutil

    shutil.rmtree(os.path.join(cfg.trainer.out_dir, "checkpoints", "step_000002"))
    with pytest.raises(CheckpointError, match="names step_000002, but .* is missing"):
        Trainer(make_config("trainer.steps=4", "trainer.save_interval=1", "soup.mix_fraction=0"))


def run_cli(cfg_args, out):
    return subprocess.Popen([sys.executable, "-m", "soup_megatron.cli", "train", "--config", "configs/tiny_cpu.yaml",
                             *cfg_args, f"trainer.out_dir={out}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("model", ["dense", pytest.param("moe-replayed", marks=pytest.mark.slow)])
def test_kill_and_resume_matches_uninterrupted_run(tiny_model, tiny_moe_model, tmp_path, model):
    """With one-step-off rollout (the checkpoint holds the next step's samples), dynamic sampling's refill
    rounds (prefixes made on demand), the overlong penalty, MIS and token-budget micro-batches on, as they
    all draw on per-step state a resume must restore; and a MoE model replaying the engine's routing (the
    checkpointed samples carry theirs)."""
    from tests.conftest import TINY

    moe = ["model.tiny.num_experts=4", "model.tiny.num_kv_heads=2", "actor.routing_replay=rollout"]
    path = tiny_moe_model if model != "dense" else tiny_model
    args = TINY + [f"model.path={path}", "trainer.steps=8", "trainer.save_interval=2", "trainer.eval_interval=4",
                   "history.interval=2", "history.keep=2", "soup.lookahead=2", "soup.cut_of=max_length",
                   "soup.history_steps_per_call=2", "reward.function=tests.helpers:half_constant_reward",
                   "algo.dynamic_sampling=true", "algo.overlong_penalty_len=6", "algo.rollout_correction=mis",
                   "actor.max_tokens_per_micro_batch=160", "rollout.async_steps=1", *(moe if model != "dense" else [])]
    straight = run_cli(args, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    killed = run_cli(args, tmp_path / "killed")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill -9 (no cleanup at all) once step 4 is checkpointed, mid-step 5 or so
        if latest.is_file() and latest.read_text().strip() >= "step_000004":
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    rows_before = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert rows_before[-1]["step"] < 8, "the run finished before it could be killed"
    resumed = run_cli(args, tmp_path / "killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    a = read_state_dict(tmp_path / "straight" / "checkpoints" / "step_000008" / "actor" / "model")
    b = read_state_dict(tmp_path / "killed" / "checkpoints" / "step_000008" / "actor" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert comparable(read_metrics(tmp_path / "straight" / "metrics.jsonl")) == \
        comparable(read_metrics(tmp_path / "killed" / "metrics.jsonl"))
    assert json.loads((tmp_path / "straight" / "history" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "killed" / "history" / "manifest.json").read_text())
    rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    if model == "dense":  # the MoE model's groups happen to need no refill
        assert sum(r.get("dynamic/refill_rounds", 0) for r in rows) > 0  # refills happened, and resumed exactly
    assert max(r.get("staleness/max", 0) for r in rows) == 1
    if model != "dense":
        assert all(r["moe/routing_given_share"] == 1.0 for r in rows if "loss" in r)


def test_sigterm_leaves_no_process_behind(tiny_model, tmp_path):
    from tests.conftest import TINY

    # a SIGTERM'd run leaves no process behind (the background prefix worker included)
    run = run_cli(TINY + [f"model.path={tiny_model}", "trainer.steps=50"], tmp_path / "term")
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    children = child_pids(run.pid)
    assert children, "the run should have a prefix worker process"
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    wait_until(lambda: not [pid for pid in children if alive(pid)], timeout=30)
    left = [pid for pid in children if alive(pid)]
    assert not left, f"processes left running after SIGTERM: {left}"


def test_a_stop_is_asked_by_the_job_scripts_file_and_a_requeue_without_checkpoints_is_refused(tmp_path, monkeypatch):
    from soup_megatron.train.shutdown import STOP_FILE, refuse_restart_without_checkpoints, stop_asked

    assert not stop_asked(tmp_path)
    (tmp_path / STOP_FILE).touch()
    assert stop_asked(tmp_path)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    refuse_restart_without_checkpoints(tmp_path / "checkpoints")  # a first start: nothing to resume yet
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(CheckpointError, match="restart 2 of Slurm job 77, but .*checkpoints does not exist"):
        refuse_restart_without_checkpoints(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    refuse_restart_without_checkpoints(tmp_path / "checkpoints")
