"""The prefix cache fills ahead of the trainer, pins what it reads, and is deterministic."""

import pytest

from soup_megatron.config import RolloutConfig
from soup_megatron.history.prefix_cache import PrefixCache
from soup_megatron.history.replay import ReplayBuffer
from soup_megatron.history.store import CheckpointStore
from soup_megatron.model.hf import load_tokenizer
from soup_megatron.rollout import build_engine

from .helpers import wait_until


def make_store(tmp_path, tiny_model, keep):
    engine = build_engine(RolloutConfig(), tiny_model)
    store = CheckpointStore(tmp_path / "history", keep=keep)
    import shutil

    store.add(0, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in tiny_model.iterdir()])
    return store, engine


def plan_for(tok):
    prompts = [f"{a}+{a + 1}+2=?\n" for a in range(1, 9)]
    return lambda step: [(f"p{step}-{i}", tuple(tok.encode(prompts[(step + i) % 8]))) for i in range(3)]


def make_cache(store, tok, **kw):
    defaults = dict(lookahead=0, pick="uniform", seed=3, max_new_tokens=16, temperature=1.0,
                    rollout=RolloutConfig(threads=1))
    return PrefixCache(store, plan_for(tok), **{**defaults, **kw})


def test_lookahead_fills_ahead_of_time_and_is_deterministic(tmp_path, tiny_model):
    tok = load_tokenizer(tiny_model)
    store, _ = make_store(tmp_path, tiny_model, keep=2)
    cache = make_cache(store, tok, lookahead=2)
    try:
        first = cache.take(0)  # nothing was generated ahead for the first step: made on demand
        assert len(first) == 3 and all(t is not None and t.versions == [0] * len(t.token_ids) for t in first)
        cache.schedule(0)  # step 0's rollout is done: steps 1 and 2 go out
        # without the trainer asking again, steps 1 and 2 are generated in the background
        assert wait_until(lambda: {1, 2} <= cache.ready_steps()), "lookahead steps were not filled ahead of time"
        assert cache.generation_seconds[2] > 0
        second = cache.take(1)
        cache.schedule(1)  # step 3 goes out; wait_idle returns once it is back (what the step benchmark waits for)
        cache.wait_idle()
        assert 3 in cache.ready_steps() and 3 in cache.generation_seconds
    finally:
        cache.close()
    again = make_cache(store, tok)
    try:
        assert [t.token_ids for t in again.take(1)] == [t.token_ids for t in second]
    finally:
        again.close()


def test_pending_jobs_pin_their_checkpoints(tmp_path, tiny_model):
    tok = load_tokenizer(tiny_model)
    store, engine = make_store(tmp_path, tiny_model, keep=1)
    cache = make_cache(store, tok, lookahead=2, pick="newest", seed=0, max_new_tokens=8)
    try:
        cache.schedule(-1)  # lookahead jobs for steps 0 and 1, both reading version 0
        for v in (2, 4):
            store.add(v, lambda tmp: engine.model.save_pretrained(tmp))
        assert store.members() == [4]
        assert store.path(0).is_dir(), "version 0 is referenced by pending prefix jobs"
        assert cache.pinned_versions() == {0}
        cache.take(0)
        assert store.path(0).is_dir()
        cache.take(1)
        assert not store.path(0).exists(), "released once no job references it"
        assert cache.state() == {"jobs": []}
    finally:
        cache.close()


def test_jobs_of_several_steps_resume_exactly_and_pin_until_their_last_step(tmp_path, tiny_model):
    """soup.history_steps_per_call=2: one job (one generation call per version) covers two steps; a job
    saved half-taken is regenerated on resume, and its remaining step matches the uninterrupted one."""
    tok = load_tokenizer(tiny_model)
    store, engine = make_store(tmp_path, tiny_model, keep=1)
    cache = make_cache(store, tok, lookahead=2, steps_per_call=2, pick="newest")
    try:
        cache.take(0)  # on demand: a job of steps 0 and 1
        assert sorted(cache._wanted) == [1]
        cache.schedule(0)  # step 1 is covered, step 2 starts a job of steps 2 and 3
        assert sorted(cache._pending) == [0, 2] and sorted(cache._wanted) == [1, 2, 3]
        cache.take(1)
        store.add(5, lambda tmp: engine.model.save_pretrained(tmp))  # the pool moves on: v0 leaves it
        assert store.path(0).is_dir() and cache.pinned_versions() == {0}
        two = cache.take(2)
        state = cache.state()
        assert state == {"jobs": [{"steps": [2, 3], "snapshot": [0], "wanted": [3]}]}
        work = cache.step_stats(2)  # the job's time and loads, shared by its two steps
        assert work["time/prefix_generate"] == cache.generation_seconds[3] > 0
        assert work["tokens/history_decoded"] == sum(len(t.token_ids) for t in two) > 0
        resumed = make_cache(store, tok, lookahead=2, steps_per_call=2, pick="newest")
        try:
            resumed.restore(state)  # as a trainer resumed from a checkpoint after step 2 does
            assert resumed.state() == state
            three_resumed = resumed.take(3)
            assert resumed.ready_steps() == set(), "step 2 was regenerated but is not handed out again"
        finally:
            resumed.close()
        three = cache.take(3)
        assert [t.token_ids for t in three] == [t.token_ids for t in three_resumed]
        assert [t.logprobs for t in three] == [t.logprobs for t in three_resumed]
        assert not store.path(0).exists(), "released once the job's last step was taken"
        assert all(t.versions == [0] * len(t.token_ids) for t in two + three)
    finally:
        cache.close()


def test_versions_are_placed_where_they_are_held_and_loaded_once():
    from soup_megatron.history.prefix_cache import place_versions

    assert place_versions([None], [3, 1, 3]) == [[1, 3]]
    assert place_versions([3], [1, 3, 2]) == [[3, 1, 2]]  # one engine: the held version first, no reload
    # two servers: each keeps what it holds; a new version goes to the one whose weights this job does not need
    assert place_versions([1, 2], [2, 5]) == [[5], [2]]
    assert place_versions([1, 2], [1, 2, 5, 6]) == [[1, 5], [2, 6]]
    assert place_versions([0, 0], [0, 4]) == [[0], [4]]


def test_dead_worker_is_reported_not_waited_on(tmp_path, tiny_model):
    tok = load_tokenizer(tiny_model)
    store, _ = make_store(tmp_path, tiny_model, keep=1)
    cache = make_cache(store, tok, pick="newest", seed=0, max_new_tokens=8)
    cache._proc.kill()
    cache._proc.join()
    with pytest.raises(RuntimeError, match="prefix worker died"):
        cache.take(0)
    cache.close()


def test_replay_returns_past_rollouts_of_the_same_prompt():
    from soup_megatron.data.prompts import Prompt
    from soup_megatron.sample import CONTINUATION, Sample

    def plan(step):
        return [("a", (1,)), ("b", (2,))]

    replay = ReplayBuffer(plan, per_prompt=2, seed=0)
    assert replay.take(0) == [None, None]  # nothing seen yet: those samples stay on-policy
    for n in range(3):
        s = Sample(Prompt("a", "q", "1"), [1], [5 + n, 0], [-0.1, -0.2], [n, n], [CONTINUATION] * 2, "stop")
        replay.record([s])
    got = replay.take(1)
    assert got[1] is None
    assert got[0].token_ids in ([6, 0], [7, 0])  # per_prompt=2 keeps the newest two
    assert got[0].versions[0] in (1, 2) and got[0].finished
    restored = ReplayBuffer(plan, per_prompt=2, seed=0)
    restored.restore(replay.state())
    assert restored.take(1)[0].token_ids == got[0].token_ids
