"""The in-process rollout engine and the local actor agree on every log-prob they both compute."""

import pytest
import torch

from soup_megatron.actor import build_actor
from soup_megatron.actor.base import TokenBatch
from soup_megatron.algo.loss import LossConfig
from soup_megatron.config import RolloutConfig
from soup_megatron.model.hf import CheckpointError, load_tokenizer
from soup_megatron.rollout import GenerationRequest, build_engine
from soup_megatron.sample import CONTINUATION, PREFIX, PROMPT


@pytest.fixture
def engine(tiny_model):
    return build_engine(RolloutConfig(), tiny_model)


def requests(tok, texts, prefix="", max_new=20):
    prefix_ids = tuple(tok.encode(prefix)) if prefix else ()
    return [GenerationRequest(tuple(tok.encode(t)), prefix_ids, max_new) for t in texts]


def test_generation_is_seeded_and_respects_budgets(engine, tiny_model):
    tok = load_tokenizer(tiny_model)
    reqs = requests(tok, ["3+4+5=?\n", "1+1+1+1=?\n", "9+9+9=?\n"])
    reqs.append(GenerationRequest(tuple(tok.encode("2+2+2=?\n")), (), 3))
    a = engine.generate(reqs, 1.0, seed=5)
    b = engine.generate(reqs, 1.0, seed=5)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for g, r in zip(a, reqs):
        assert len(g.token_ids) == len(g.logprobs) <= r.max_new_tokens
        assert g.finish_reason == ("stop" if g.token_ids[-1] == tok.eos_token_id else "length")
        assert g.version == 0
        assert all(lp <= 0 for lp in g.logprobs)
    assert engine.generate([GenerationRequest((1, 2), (), 0)], 1.0, 0)[0].token_ids == []


def test_generated_logprobs_match_scoring_and_actor(engine, tiny_model, make_config):
    """Batched KV-cache decoding with left padding = a plain forward of the finished sequence."""
    tok = load_tokenizer(tiny_model)
    reqs = requests(tok, ["3+4+5=?\n", "12+1+7+3=?\n"], prefix="3+4=7\n")
    gens = engine.generate(reqs, 1.0, seed=1)
    contexts = [list(r.prompt_ids) + list(r.prefix_ids) for r in reqs]
    scored = engine.score(contexts, [g.token_ids for g in gens], 1.0)
    for g, s in zip(gens, scored):
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(s), atol=1e-5)
    actor = build_actor(make_config().actor, tiny_model)
    rows = [c + g.token_ids for c, g in zip(contexts, gens)]
    width = max(map(len, rows))
    ids = torch.full((2, width), tok.eos_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    z = torch.zeros(2, width - 1)
    logp, ent = actor.logprobs(TokenBatch(ids, mask, z.long(), z, z.long(), torch.zeros(2)), 1.0, with_entropy=True)
    for i, (c, g) in enumerate(zip(contexts, gens)):
        got = logp[i, len(c) - 1: len(c) - 1 + len(g.token_ids)]
        assert torch.allclose(got, torch.tensor(g.logprobs), atol=1e-5)
    assert (ent >= 0).all()


def test_prefix_is_continued_not_regenerated(engine, tiny_model):
    tok = load_tokenizer(tiny_model)
    prefix = "3+4=7\n7+5="
    gens = engine.generate(requests(tok, ["3+4+5=?\n"], prefix=prefix, max_new=10), 0.0, 0)
    plain = engine.generate([GenerationRequest(tuple(tok.encode("3+4+5=?\n" + prefix)), (), 10)], 0.0, 0)
    assert gens[0].token_ids == plain[0].token_ids


def test_load_weights_changes_version_and_bad_source_keeps_old(engine, tiny_model, tmp_path):
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    with pytest.raises(CheckpointError):
        engine.load_weights(tmp_path, 3)  # no safetensors here
    with pytest.raises(CheckpointError, match="do not fit"):
        engine.load_weights({"not.a.weight": torch.zeros(1)}, 3)
    assert engine.version == 0
    assert all(torch.equal(before[k], v) for k, v in engine.model.state_dict().items())
    changed = {k: v + 0.01 for k, v in before.items()}
    engine.load_weights(changed, 7)
    assert engine.version == 7
    assert torch.equal(engine.model.state_dict()["model.norm.weight"], changed["model.norm.weight"])


def test_actor_update_moves_logprobs_in_advantage_direction(tiny_model, make_config):
    cfg = make_config("actor.lr=0.001")
    actor = build_actor(cfg.actor, tiny_model)
    tok = load_tokenizer(tiny_model)
    good, bad = tok.encode("1+1=?\n1+1=2\nA: 2"), tok.encode("1+1=?\n1+1=3\nA: 3")
    ids = torch.tensor([good, bad])
    mask = torch.ones_like(ids)
    seg = torch.full((2, ids.shape[1] - 1), PROMPT)
    seg[:, 5:] = CONTINUATION
    seg[:, 5:8] = PREFIX
    batch = TokenBatch(ids, mask, seg, torch.zeros(seg.shape), torch.zeros(seg.shape, dtype=torch.long),
                       torch.tensor([1.0, -1.0]))
    batch.old_logp, _ = actor.logprobs(batch, 1.0)
    batch.behaviour_logp = batch.old_logp.clone()
    out = actor.train_minibatch(batch, LossConfig(), 1.0)
    after, _ = actor.logprobs(batch, 1.0)
    trained = (seg > 0).float()
    def margin(logp):
        return float((logp[0] * trained[0]).sum() - (logp[1] * trained[1]).sum())

    assert margin(after) > margin(batch.old_logp)  # the rewarded answer gained on the punished one
    assert out["ratio"].numel() == out["segment"].numel()


def test_saved_tokenizer_loads_back_unchanged(tiny_model):
    """AutoTokenizer (and therefore SGLang) must see exactly the tokens the model was trained on."""
    from transformers import AutoConfig

    from soup_megatron.model.tiny import build_tokenizer

    text = "7+12+5=?\n7+12=19\n19+5=24\nA: 24"
    loaded = load_tokenizer(tiny_model)
    assert loaded.encode(text) == build_tokenizer().encode(text)
    assert len(loaded.encode(text)) == len(text)  # one token per character of the task
    assert loaded.decode(loaded.encode(text)) == text
    assert AutoConfig.from_pretrained(tiny_model).model_type == "qwen2"


def test_generation_stops_at_every_eos_id_the_checkpoint_names(tiny_chat_model):
    """generation_config.json names the tokenizer's EOS and the newline: a response ends at either,
    the stop token included, finish reason `stop`."""
    from soup_megatron.model.hf import stop_token_ids

    tok = load_tokenizer(tiny_chat_model)
    newline = tok.encode("\n")[0]
    assert stop_token_ids(tiny_chat_model) == {tok.eos_token_id, newline}
    engine = build_engine(RolloutConfig(), tiny_chat_model)
    gens = engine.generate(requests(tok, ["3+4+5=?\n", "1+1+1+1=?\n"] * 8, max_new=24), 1.0, seed=3)
    assert any(g.token_ids[-1] == newline for g in gens)  # the tiny model writes one step per line
    for g in gens:
        stops = [i for i, t in enumerate(g.token_ids) if t in (newline, tok.eos_token_id)]
        assert stops in ([], [len(g.token_ids) - 1])  # nothing after the first stop token
        assert g.finish_reason == ("stop" if stops else "length")


def test_every_export_is_a_complete_checkpoint(tiny_chat_model, make_config, tmp_path, capsys):
    """History members and disk weight-sync exports carry the source's tokenizer, chat template and
    generation config; `eval` with the chat template runs on a history member."""
    from soup_megatron.cli import main
    from soup_megatron.model.hf import HF_SIDE_FILES
    from soup_megatron.train.trainer import Trainer

    side_files = {name for name in HF_SIDE_FILES if (tiny_chat_model / name).is_file()}
    assert {"chat_template.jinja", "generation_config.json", "tokenizer.json", "config.json"} <= side_files
    cfg = make_config(f"model.path={tiny_chat_model}", "data.chat_template=true", "rollout.weight_sync=disk",
                      "trainer.steps=2", "trainer.eval_interval=0", "history.interval=1")
    trainer = Trainer(cfg)
    trainer.run()
    exports = [trainer.out / "history" / "v000000", trainer.out / "history" / "v000002",
               *sorted((trainer.out / "weights").glob("v*"))]
    assert len(exports) == 3
    for export in exports:
        assert side_files <= {p.name for p in export.iterdir()}, export
        for name in side_files - {"config.json", "generation_config.json"}:  # written by the exporter itself
            assert (export / name).read_bytes() == (tiny_chat_model / name).read_bytes(), (export, name)
    assert main(["eval", "--config", "configs/tiny_cpu.yaml", "--checkpoint", str(exports[1]), "--n", "1", "--k", "1",
                 "--limit", "2", "--out", str(tmp_path / "eval.json"), "data.chat_template=true"]) == 0
    assert "pass@1" in capsys.readouterr().out
