"""Mixture-of-experts models on the local path: the tiny Qwen3-MoE, its experts' weights as checkpoints store
them, routing recorded by the in-process engine and replayed by the local actor (actor.routing_replay)."""

import json
from pathlib import Path

import pytest
import torch

from soup_megatron.config import ConfigError, RolloutConfig, load_config
from soup_megatron.model.hf import CheckpointError, fuse_experts, load_model, load_tokenizer, read_state_dict
from soup_megatron.model.routing import NOT_GIVEN, RoutingTap, disagreement, routing_shape
from soup_megatron.rollout import GenerationRequest, build_engine


@pytest.fixture(scope="module")
def moe(tiny_moe_model):
    """The tiny MoE (4 experts, top-2, 2 layers) with its routers tapped."""
    model = load_model(tiny_moe_model)
    tap = RoutingTap(model)
    yield model, tap
    tap.close()


def forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_moe_is_a_qwen3_moe_whose_checkpoint_stores_each_expert(tiny_moe_model):
    config = json.loads((tiny_moe_model / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    names = read_state_dict(tiny_moe_model)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names and "model.layers.0.mlp.gate.weight" in names


def test_per_expert_tensors_fuse_into_the_model_and_incomplete_ones_are_refused(tiny_moe_model):
    model = load_model(tiny_moe_model)
    own = model.state_dict()
    stored = read_state_dict(tiny_moe_model)
    fused = fuse_experts(stored, own)
    assert sorted(fused) == sorted(own)
    for name, tensor in fused.items():
        assert torch.equal(tensor, own[name]), name
    del stored["model.layers.0.mlp.experts.2.up_proj.weight"]
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.experts: the experts' tensors are incomplete"):
        fuse_experts(stored, own)


def test_replaying_the_natural_routing_changes_nothing_and_other_experts_change_the_logits(moe):
    model, tap = moe
    ids = torch.randint(1, 200, (3, 11), generator=torch.Generator().manual_seed(0))
    natural_logits = forward(model, ids)
    natural = tap.take(3, 11)
    assert natural.shape == (3, 11, 2, 2) and natural.dtype == torch.int16 and routing_shape(model) == (2, 2)
    with tap.replaying(natural):
        assert torch.equal(forward(model, ids), natural_logits)
    assert torch.equal(tap.take(3, 11), natural)  # what the routers chose, recorded while replaying
    other = (natural + 1) % 4
    with tap.replaying(other):
        other_logits = forward(model, ids)
    tap.discard()
    assert (other_logits - natural_logits).abs().max() > 1e-3
    first_five = other.clone()
    first_five[:, 5:] = NOT_GIVEN  # the rest of each row routes freely
    with tap.replaying(first_five):
        partly = forward(model, ids)
    tap.discard()
    # a position sees itself and earlier ones only: the first five are those of the full replay
    assert torch.allclose(partly[:, :5], other_logits[:, :5], atol=1e-5)
    assert disagreement(natural, other).all() and not disagreement(natural, natural.flip(-1)).any()


def test_the_router_learns_under_replay(moe):
    """The experts are given, their weights are the router's probabilities of them: its gradient is not zero."""
    model, tap = moe
    ids = torch.randint(1, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    forward(model, ids)
    other = (tap.take(2, 9) + 1) % 4
    model.zero_grad()
    with tap.replaying(other):
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    tap.discard()
    assert all(float(router.weight.grad.abs().sum()) > 0 for router in tap.routers)


def test_engine_returns_the_routing_of_every_position_it_computed(tiny_moe_model, moe):
    """Rows of different lengths, one with a prefix to prefill, one that stops early, one with no budget:
    each generation's routing is the one a teacher-forced pass over its tokens chooses, position by position."""
    model, tap = moe
    engine = build_engine(RolloutConfig(), tiny_moe_model, return_routing=True)
    tok = load_tokenizer(tiny_moe_model)
    requests = [GenerationRequest(tuple(tok.encode("3+4+5=?\n")), (), 12),
                GenerationRequest(tuple(tok.encode("13+4+5+7=?\n")), tuple(tok.encode("13+4=")), 20),
                GenerationRequest(tuple(tok.encode("9+9=?\n")), (), 2),
                GenerationRequest(tuple(tok.encode("1+1=?\n")), (), 0)]
    generations = engine.generate(requests, 1.0, seed=3)
    assert generations[3].routing is None and len(generations[2].token_ids) == 2
    for request, generation in zip(requests[:3], generations):
        tokens = [*request.prompt_ids, *request.prefix_ids, *generation.token_ids]
        forward(model, torch.tensor([tokens]))
        assert torch.equal(generation.routing, tap.take(1, len(tokens))[0, :-1])


def run_with_replay(make_config, tiny_moe_model, mode: str, out: str):
    from soup_megatron.train.trainer import Trainer

    cfg = make_config(f"model.path={tiny_moe_model}", "model.tiny.num_experts=4", "model.tiny.num_kv_heads=2",
                      f"actor.routing_replay={mode}", "trainer.steps=3", "trainer.eval_interval=0",
                      "soup.mix_fraction=0.5", "history.interval=1", out=out)
    Trainer(cfg).run()
    lines = (Path(cfg.trainer.out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_rollout_replay_trains_on_the_engines_routing(make_config, tiny_moe_model):
    """R3 with SOUP: every scored position comes with the engine's routing (its prefill covered the historical
    prefix too); with one engine and one trainer in the same precision they agree, and pi_old equals the
    engine's log-probs."""
    steps = run_with_replay(make_config, tiny_moe_model, "rollout", "r3")
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["moe/routing_given_share"] == 1.0 and r["moe/routing_disagreement"] == 0.0
        assert r["logp_gap/max"] < 1e-4
    assert any("moe/routing_disagreement/prefix" in r for r in steps)  # mixed samples were trained


def test_recorded_replay_trains(make_config, tiny_moe_model):
    steps = run_with_replay(make_config, tiny_moe_model, "recorded", "r2")
    assert [r["step"] for r in steps] == [1, 2, 3] and all("moe/routing_given_share" not in r for r in steps)
    assert all(r["logp_gap/max"] < 1e-4 for r in steps)


def test_replay_settings_are_refused_where_they_cannot_work(make_config, tiny_model, tiny_moe_model):
    from soup_megatron.train.trainer import Trainer

    with pytest.raises(ConfigError, match="is a dense model"):
        Trainer(make_config("actor.routing_replay=recorded", out="dense"))
    with pytest.raises(ConfigError, match="actor.routing_replay.*with actor.megatron.recompute=full"):
        make_config("actor.routing_replay=recorded", "actor.backend=megatron", "actor.megatron.recompute=full")
    with pytest.raises(ConfigError, match="model.tiny.top_k.*between 1 and model.tiny.num_experts=4"):
        load_config("configs/tiny_moe_cpu.yaml", ["model.tiny.top_k=5"])
    with pytest.raises(ConfigError, match="actor.moe.aux_loss_coef.*actor.backend=megatron"):
        load_config("configs/tiny_moe_cpu.yaml", ["actor.moe.aux_loss_coef=0.01"])
