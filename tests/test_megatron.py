"""The megatron-core actor and the HF <-> Megatron conversion, on CPU with gloo (real torchrun ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soup_megatron.config import ConfigError, MegatronConfig, load_config
from soup_megatron.mcore.model import (
    Architecture,
    UnsupportedModel,
    check_parallel_sizes,
    padded_vocab_size,
    transformer_config,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 301  # divisible by neither 2 nor 128: the embedding is padded


def family_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96)
    return {
        # untied embeddings, llama3 RoPE scaling (megatron-core's fixed factors)
        "llama": LlamaConfig(**common, max_position_embeddings=16384, tie_word_embeddings=False,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        "mistral": MistralConfig(**common, max_position_embeddings=256, sliding_window=None, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**common, max_position_embeddings=256, tie_word_embeddings=True),  # qkv bias, tied
        "qwen3": Qwen3Config(**common, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False),  # q/k norm
        # every MLP a mixture of 4 experts, top-2 renormalised
        "qwen3_moe": Qwen3MoeConfig(**common, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
                                    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                    norm_topk_prob=True),
    }


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, (name, cfg) in enumerate(family_configs().items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # norms start at ones; random values make a wrong mapping visible
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def run(*args, ranks: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                             if ranks > 1 else []), *map(str, args)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-6000:]}")
    return done


def tensors(path: Path) -> dict:
    from soup_megatron.model.hf import read_state_dict

    return read_state_dict(path)


# ---- conversion --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,tp,pp,ep,back_tp,back_ep", [
    ("llama", 2, 2, 1, 1, 1), ("qwen3_moe", 1, 1, 2, 1, 1),
    pytest.param("qwen3", 1, 2, 1, 2, 1, marks=pytest.mark.slow),
    pytest.param("qwen3_moe", 2, 1, 2, 1, 1, marks=pytest.mark.slow),  # tensor x expert parallel, read back whole
    pytest.param("mistral", 2, 1, 1, 1, 1, marks=pytest.mark.slow),
    pytest.param("qwen2", 2, 1, 1, 1, 1, marks=pytest.mark.slow)])
def test_hf_megatron_hf_round_trip_is_bit_exact(families, tmp_path, family, tp, pp, ep, back_tp, back_ep):
    """Written under one TP/PP/EP layout, read back under another (resharding by loading)."""
    src = families[family]
    run("tools/convert_hf_to_megatron.py", "--hf", src, "--out", tmp_path / "mcore", "--tp", tp, "--pp", pp,
        "--ep", ep)
    meta = json.loads((tmp_path / "mcore" / "soup_megatron.json").read_text())
    assert meta["architecture"]["family"] == family and meta["saved_with"] == {"tp": tp, "pp": pp, "ep": ep}
    run("tools/convert_megatron_to_hf.py", "--megatron", tmp_path / "mcore", "--out", tmp_path / "hf", "--tp", back_tp,
        "--ep", back_ep)
    before, after = tensors(src), tensors(tmp_path / "hf")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left beside the outputs


def test_conversion_tools_refuse_bad_input_with_clear_errors(families, tmp_path, capsys):
    """Refusals of the paths and sizes come before any process starts, so they are called in this process
    (each tool is `main` of soup_megatron.mcore.convert); the conversion and the template that does not
    describe the checkpoint run the tools as processes."""
    from soup_megatron.mcore.convert import main as convert

    def refused(*argv) -> str:
        assert convert([*map(str, argv)]) == 2
        return capsys.readouterr().err

    assert f"{tmp_path / 'missing'} does not exist" in refused("hf-to-megatron", "--hf", tmp_path / "missing",
                                                               "--out", tmp_path / "x")
    assert f"{tmp_path}: no config.json" in refused("hf-to-megatron", "--hf", tmp_path, "--out", tmp_path / "x")
    assert "tensor_parallel=3 does not divide" in refused("hf-to-megatron", "--hf", families["qwen2"],
                                                         "--out", tmp_path / "x", "--tp", 3)
    run("tools/convert_hf_to_megatron.py", "--hf", families["qwen2"], "--out", tmp_path / "mcore")
    assert "already exists" in refused("hf-to-megatron", "--hf", families["qwen2"], "--out", tmp_path / "mcore")
    mismatch = run("tools/convert_megatron_to_hf.py", "--megatron", tmp_path / "mcore", "--out", tmp_path / "hf",
                   "--hf-template", families["llama"], check=False)
    assert mismatch.returncode != 0 and "does not describe the model" in mismatch.stderr
    assert "family is qwen2 in the checkpoint, llama in the template" in mismatch.stderr
    assert not (tmp_path / "hf").exists()
    assert "not a complete soup-megatron distributed checkpoint" in refused(
        "megatron-to-hf", "--megatron", families["qwen2"], "--out", tmp_path / "hf")
    assert not list(tmp_path.glob("x*"))  # nothing was written for a refused conversion


# ---- model and actor parity --------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_equal_hf_logits(families, tmp_path, tp):
    run("tests/mcore_ranks.py", "logits", *families.values(), "--tp", tp, "--out", tmp_path / "r.json", ranks=tp)
    result = json.loads((tmp_path / "r.json").read_text())
    assert sorted(result) == sorted(families)
    for family, r in result.items():
        assert r["max_abs_diff"] < 1e-5, (family, r)
        assert r["padding_columns"] == padded_vocab_size(VOCAB, MegatronConfig(tensor_parallel=tp)) - VOCAB > 0


# The actor parity layouts. Those of one tier and one number of ranks run in one torchrun launch, which the
# first of their tests starts (`parity`): each rank imports torch and megatron once instead of once a layout.
PARITY: dict[str, tuple[str, int, dict]] = {}  # layout id -> (its launch's group, ranks, actor_parity's sizes)


def parity_layout(layout_id: str, ranks: int, model: str = "dense", slow: bool = False, **sizes) -> object:
    """A layout of `ranks` ranks of `model` ("dense": two key/value heads, "4 layers", "moe") as a test
    parameter: `sizes` are actor_parity's (tp, pp, vp, cp, sp, ep, replay, max_tokens)."""
    group = f"megatron-parity-{ranks}-ranks{'-slow' if slow else ''}"
    PARITY[layout_id] = (group, ranks, {"model": model, **sizes})
    return pytest.param(layout_id, id=layout_id,
                        marks=[pytest.mark.xdist_group(group), *([pytest.mark.slow] if slow else [])])


@pytest.fixture(scope="module")
def parity(request, tiny_model_kv2, tiny_model_4_layers, tiny_moe_model, tmp_path_factory):
    """The measured differences of a layout: the first test of a group runs all of its group's layouts that this
    session selected (the group's tests run on one pytest-xdist worker)."""
    models = {"dense": tiny_model_kv2, "4 layers": tiny_model_4_layers, "moe": tiny_moe_model}
    selected = {item.callspec.params["layout"] for item in request.session.items if "parity" in item.fixturenames}
    results: dict = {}

    def result(layout_id: str) -> dict:
        if layout_id not in results:
            group, ranks, _ = PARITY[layout_id]
            work = tmp_path_factory.mktemp(group)
            layouts = {i: {"model_dir": str(models[sizes["model"]]),
                           **{k: v for k, v in sizes.items() if k != "model"}}
                       for i, (g, _, sizes) in PARITY.items() if g == group and i in selected}
            (work / "layouts.json").write_text(json.dumps(layouts))
            run("tests/mcore_ranks.py", "actors", "--layouts", work / "layouts.json", "--out", work / "r.json",
                "--work", work, ranks=ranks, timeout=300 * len(layouts))
            results.update(json.loads((work / "r.json").read_text()))
        return results[layout_id]
    return result


def dense_layout(layout_id: str, tp=1, pp=1, vp=1, cp=1, sp=False, ranks=2, slow=False) -> object:
    return parity_layout(layout_id, ranks, "4 layers" if vp > 1 else "dense", slow, tp=tp, pp=pp, vp=vp, cp=cp,
                         sp=sp)  # 2 stages x 2 chunks need 4 layers


@pytest.mark.parametrize("layout", [
    dense_layout("tp2-sp", tp=2, sp=True), dense_layout("pp2", pp=2, slow=True), dense_layout("pp2-vp2", pp=2, vp=2),
    dense_layout("cp2", cp=2), dense_layout("tp2", tp=2, slow=True), dense_layout("dp2", slow=True),
    dense_layout("tp2-pp2", tp=2, pp=2, ranks=4, slow=True), dense_layout("pp2-dp2", pp=2, ranks=4, slow=True),
    dense_layout("pp2-vp2-dp2", pp=2, vp=2, ranks=4, slow=True),
    dense_layout("tp2-sp-cp2", tp=2, cp=2, sp=True, ranks=4, slow=True)])
def test_megatron_actor_matches_local_actor(parity, layout):
    """Ranks as tensor-parallel slices (with sequence parallelism: each also holds 1/tp of the sequence
    between layers), pipeline stages (through megatron's 1F1B schedule, or its interleaved one over two
    model chunks per stage; the tied embedding lives on both end stages), context-parallel ranks (two
    chunks of each sequence apiece) and data-parallel replicas: log-probs, entropy, one SOUP update
    (loss, gradients, clipped norm, Adam update) equal the local actor's; save/resume (in the same actor
    and in a new one) repeats a step."""
    _, ranks, sizes = PARITY[layout]
    assert_parity(parity(layout), sizes.get("sp", False), nothing_sharded=ranks == sizes["tp"] * sizes["pp"])


@pytest.mark.parametrize("layout", [
    parity_layout("ep2-replay", 2, "moe", ep=2, replay=True),
    parity_layout("tp2-sp-ep2-replay", 4, "moe", slow=True, tp=2, sp=True, ep=2, replay=True),
    parity_layout("pp2-replay", 2, "moe", slow=True, pp=2, replay=True)])
def test_megatron_moe_actor_matches_local_actor(parity, layout):
    """A Qwen3-MoE with its 4 experts split over two expert-parallel ranks (the alltoall dispatcher sends each
    token to the ranks of its experts; with tensor parallelism each expert is split too, under the sequence
    parallelism megatron requires there), or its layers over two pipeline stages: log-probs, one SOUP update
    and save/resume as in the dense layouts. With replay both actors route by one given routing (other experts
    than the routers' own at half the positions): it moves the log-probs, and megatron's routers report the
    same own choices as the local ones."""
    _, ranks, sizes = PARITY[layout]
    tp, pp = sizes.get("tp", 1), sizes.get("pp", 1)
    r = parity(layout)
    # an expert gets a share of the tokens only, so fewer of its gradient entries are clearly non-zero
    assert_parity(r, tp > 1, nothing_sharded=ranks == tp * pp, compared=0.8, tied=False)
    assert r["replay_moved_logp"] > 1e-3 and r["routing_differs_at"] == 0
    local, megatron = r["expert_load_max"]  # the routers' balance over the update's tokens, summed over the ranks
    assert 1.0 <= local <= 2.0 and abs(local - megatron) < 1e-6


@pytest.mark.parametrize("layout", [parity_layout("pp2-token-budget", 2, pp=2, max_tokens=60)])
def test_token_budget_micro_batches_match_row_micro_batches(parity, layout):
    """The megatron actor's length-bucketed micro-batches (actor.max_tokens_per_micro_batch, through the
    1F1B schedule of two stages) give the local actor's loss, gradients and update made with row
    micro-batches."""
    r = parity(layout)
    assert r["micro_batch_rows"] == [2, 2, 2, 2]  # rows of 30 .. 16 tokens, two per 60-token budget
    assert_parity(r, sp=False, nothing_sharded=True)


def assert_parity(r: dict, sp: bool, nothing_sharded: bool, compared: float = 0.9, tied: bool = True) -> None:
    assert r["sequence_parallel"] == sp
    assert r["corrected_tokens"] > 0  # the TIS rollout correction truncated some continuation tokens
    assert r["logp_diff"] < 1e-4 and r["entropy_diff"] < 1e-4
    assert abs(r["loss_local"] - r["loss_megatron"]) < 1e-5 * max(1.0, abs(r["loss_local"]))
    assert abs(r["grad_norm_local"] - r["grad_norm_megatron"]) < 1e-4 * r["grad_norm_local"]
    assert r["grad_norm_local"] > r["grad_clip"]  # the update was clipped: clipping is part of the comparison
    if nothing_sharded:  # gradients compared directly (the updates are compared in every layout)
        assert r["grad_max_rel_diff"] < 1e-4
    assert r["update_max_diff_where_grad_above_1e-6"] < 1e-6 and r["update_max"] > 5e-4
    assert r["share_of_entries_compared"] > compared
    assert r["segment_stats_diff"] < 1e-4 and r["segment_stats_keys_match"]
    assert r["resume_loss"][0] == r["resume_loss"][1] == r["resume_loss"][2] and r["resume_weight_diff"] == 0.0
    # a tied output layer is in the local state dict, not in HF files
    assert r["names_only_local"] == (["lm_head.weight"] if tied else []) and r["names_only_megatron"] == []


@pytest.mark.slow  # 55-80 s each
@pytest.mark.parametrize("layout, converted_with", [
    (["tensor_parallel=2"], "--pp"), (["pipeline_parallel=2"], "--tp"), (["expert_parallel=2"], "--pp")],
    ids=["tensor", "pipeline", "experts-replayed"])
def test_soup_run_with_megatron_actor_on_two_ranks(tiny_model_kv2, tiny_moe_model, tmp_path, layout, converted_with):
    """`torchrun -m soup_megatron.cli train actor.backend=megatron` on two tensor-parallel ranks (both get every
    row), two pipeline stages, or a MoE model's experts over two expert-parallel ranks that are two data-parallel
    replicas of the rest (each gets its own rows), replaying the in-process engine's routing: rank 0 drives,
    rank 1 follows; the actor starts from a converted checkpoint (written with another layout); the run trains,
    checkpoints (torch_dist + HF history), resumes and exports; both ranks exit. The other layouts' numerics,
    save and load in a new actor are the parity tests' (interleaved, context and plain data parallel ran here
    too until CI time was cut: the driver/follower path they took is these three's)."""
    from tests.conftest import TINY

    moe = "expert_parallel=2" in layout
    model = tiny_moe_model if moe else tiny_model_kv2
    # the actor starts from a converted megatron checkpoint (as `launch.convert_from_hf` arranges)
    run("tools/convert_hf_to_megatron.py", "--hf", model, "--out", tmp_path / "mcore", converted_with, 2)
    args = ["-m", "soup_megatron.cli", "train", "--config", "configs/tiny_cpu.yaml", *TINY,
            f"model.path={model}", "model.tiny.num_kv_heads=2", f"trainer.out_dir={tmp_path / 'run'}",
            "actor.backend=megatron", *(f"actor.megatron.{size}" for size in layout),
            f"actor.megatron.checkpoint={tmp_path / 'mcore'}", "trainer.eval_interval=0", "trainer.save_interval=2",
            *(["model.tiny.num_experts=4", "actor.routing_replay=rollout", "actor.moe.aux_loss_coef=0.01",
               "actor.moe.z_loss_coef=0.001"] if moe else [])]
    run(*args, "trainer.steps=2", ranks=2)
    run(*args, "trainer.steps=3", ranks=2)  # resumes from step 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3]
    assert all(r["logp_gap/max"] < 1e-4 for r in rows if "logp_gap/max" in r)  # engine weights = actor weights
    if moe:  # the engine's routing (in fp32, as the trainer's) is replayed at every scored position, and the
        # router's own losses are on and logged
        for r in (r for r in rows if "loss" in r):
            assert r["moe/routing_given_share"] == 1.0 and r["moe/routing_disagreement"] < 0.01
            assert r["moe/load_balancing_loss"] > 0 and r["moe/z_loss"] > 0 and r["moe/expert_load_max"] >= 1
    sent = [r for r in rows if "loss" in r]
    assert all(r["megatron/bytes_sent"] > 0 for r in sent)
    if moe:  # two data-parallel replicas: rank 1 gets half the rows, not the whole pickled batch
        assert all(r["megatron/bytes_sent"] < 0.6 * r["megatron/bytes_whole_batch_broadcast"] for r in sent), sent
    ckpt = tmp_path / "run" / "checkpoints" / "step_000003" / "actor"
    assert json.loads((ckpt / "soup_megatron.json").read_text())["version"] == 3
    assert (ckpt / "hf_config" / "config.json").is_file()
    run("tools/convert_megatron_to_hf.py", "--megatron", ckpt, "--out", tmp_path / "exported")
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_bf16_updates_accumulate_in_fp32_main_weights(tiny_model_kv2, tmp_path):
    """With bf16 parameters, megatron's optimizer keeps fp32 main weights: updates of lr = 1e-6 add up
    there, where bf16 weights of this size (spacing ~2e-4 near 0.05) could not hold them. Every parameter is
    bf16 (the norms too), so the optimizer's checkpoint holds them all and a resumed actor repeats a step."""
    from soup_megatron.actor import build_actor
    from soup_megatron.algo.loss import LossConfig
    from soup_megatron.config import ActorConfig
    from tests.mcore_ranks import soup_batch

    actor = build_actor(ActorConfig(backend="megatron", lr=1e-6, micro_batch_size=4,
                                    megatron=MegatronConfig(params_dtype="bfloat16")), tiny_model_kv2)
    batch = soup_batch(100)
    batch.old_logp = batch.behaviour_logp = actor.logprobs(batch, 1.0)[0]
    inner = actor.optimizer.chained_optimizers[0].optimizer
    main = [p for group in inner.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in main]
    for _ in range(5):
        actor.train_minibatch(batch, LossConfig(), 1.0)
    assert all(p.dtype == torch.float32 for p in main)
    assert next(actor.chunks[0].parameters()).dtype == torch.bfloat16
    moved = max(float((p - b).abs().max()) for p, b in zip(main, before))
    assert 4e-6 < moved < 6e-6  # Adam moves a weight by about lr per step (5 steps)
    assert {p.dtype for chunk in actor.chunks for p in chunk.parameters()} == {torch.bfloat16}
    actor.save_state(tmp_path / "state")
    next_loss = actor.train_minibatch(batch, LossConfig(), 1.0)["loss"]
    actor.close()
    resumed = build_actor(ActorConfig(backend="megatron", lr=1e-6, micro_batch_size=4,
                                      megatron=MegatronConfig(params_dtype="bfloat16")), tiny_model_kv2)
    resumed.load_state(tmp_path / "state")
    assert resumed.train_minibatch(batch, LossConfig(), 1.0)["loss"] == next_loss
    resumed.close()


# ---- refusals (no processes needed) --------------------------------------------------------------------
def test_unsupported_architecture_and_sizes_are_refused():
    from transformers import GPT2Config

    supported = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"
    with pytest.raises(UnsupportedModel, match=supported):
        Architecture.from_hf(GPT2Config())
    arch = Architecture.from_hf(family_configs()["qwen2"])
    with pytest.raises(UnsupportedModel,
                       match=r"tensor_parallel=3 does not divide the model's num_attention_heads=4 \(4 / 3 = 1.33\)"):
        check_parallel_sizes(arch, MegatronConfig(tensor_parallel=3))
    with pytest.raises(UnsupportedModel, match="does not divide num_hidden_layers=4"):
        check_parallel_sizes(arch, MegatronConfig(pipeline_parallel=3))
    with pytest.raises(UnsupportedModel, match="fp8='e4m3' needs Transformer Engine on a GPU"):
        transformer_config(arch, MegatronConfig(fp8="e4m3"), use_te=False)
    yarn = family_configs()["qwen2"]
    yarn.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModel, match="rope_type 'yarn' is not supported"):
        from soup_megatron.mcore.model import rope_arguments

        rope_arguments(Architecture.from_hf(yarn))


def test_mixture_of_experts_sizes_are_refused_with_the_arithmetic():
    moe = Architecture.from_hf(family_configs()["qwen3_moe"])
    assert (moe.num_experts, moe.moe_top_k, moe.moe_ffn_hidden_size, moe.moe_norm_topk) == (4, 2, 48, True)
    with pytest.raises(UnsupportedModel, match=r"expert_parallel=3 does not divide the model's num_experts=4"):
        check_parallel_sizes(moe, MegatronConfig(expert_parallel=3))
    with pytest.raises(UnsupportedModel, match="expert_parallel=2 needs a mixture-of-experts model; qwen2 is dense"):
        check_parallel_sizes(Architecture.from_hf(family_configs()["qwen2"]), MegatronConfig(expert_parallel=2))
    with pytest.raises(UnsupportedModel, match="needs actor.megatron.sequence_parallel=true"):
        check_parallel_sizes(moe, MegatronConfig(tensor_parallel=2))
    sparse = family_configs()["qwen3_moe"]
    sparse.mlp_only_layers = [0]
    with pytest.raises(UnsupportedModel, match="only models whose every layer is a mixture of experts"):
        Architecture.from_hf(sparse)


def test_interleaved_schedule_gets_at_least_two_groups_of_microbatches():
    """Groups of pipeline_parallel microbatches, two at least (one deadlocks megatron-core 0.16 with shape
    exchange); too few samples per data-parallel rank are refused with the arithmetic."""
    from soup_megatron.mcore.parallel import Layout, ParallelError, check_batch_split, interleaved_microbatches

    layout = Layout(rank=0, world=4, tp=1, pp=2, vp=2, cp=1, dp=2, tp_rank=0, pp_rank=0, dp_rank=0, cp_rank=0)
    assert [interleaved_microbatches(count, 8, layout) for count in (1, 3, 4, 5)] == [4, 4, 4, 6]
    check_batch_split(8, layout)
    with pytest.raises(ParallelError, match="at least 2 x pipeline_parallel = 4 microbatches .* has 3 samples"):
        check_batch_split(6, layout)


def test_megatron_config_is_validated(tiny_model):
    with pytest.raises(ConfigError, match='actor.megatron.fp8=.e5m2. is not allowed; choose one of: "", e4m3, hybrid'):
        load_config("configs/tiny_cpu.yaml", ["actor.megatron.fp8=e5m2"])
    with pytest.raises(ConfigError, match="actor.megatron.tensor_parallel=0 is not allowed"):
        load_config("configs/tiny_cpu.yaml", ["actor.megatron.tensor_parallel=0"])
    with pytest.raises(ConfigError, match="unknown key 'actor.megatron.tensor_paralel'"):
        load_config("configs/tiny_cpu.yaml", ["actor.megatron.tensor_paralel=2"])


def test_megatron_actor_refuses_layouts_it_cannot_run(tiny_model):
    from soup_megatron.actor import build_actor
    from soup_megatron.actor.megatron import check_layout
    from soup_megatron.config import ActorConfig
    from soup_megatron.mcore.parallel import ParallelError

    with pytest.raises(ParallelError, match="launch with `torchrun --nproc-per-node 2"):
        build_actor(ActorConfig(backend="megatron", megatron=MegatronConfig(context_parallel=2)), tiny_model)
    with pytest.raises(ParallelError, match="launch with `torchrun --nproc-per-node 2"):
        build_actor(ActorConfig(backend="megatron", megatron=MegatronConfig(pipeline_parallel=2)), tiny_model)
    # with one replica the optimizer would not shard: only TP x PP with DP > 1 is refused
    tp_pp = MegatronConfig(tensor_parallel=2, pipeline_parallel=2)
    with pytest.raises(ParallelError, match="pipeline_parallel > 1 and 2 data x context-parallel ranks to shard"):
        check_layout(tp_pp, world=8)
    check_layout(tp_pp, world=4)
    with pytest.raises(ParallelError, match="launch with `torchrun --nproc-per-node 2"):
        build_actor(ActorConfig(backend="megatron", megatron=MegatronConfig(tensor_parallel=2)), tiny_model)


@pytest.mark.slow
def test_bench_actor_compares_megatron_with_local(tiny_model):
    from tests.conftest import TINY

    done = run("tools/bench_actor.py", "--steps", "2", "--warmup", "1", *TINY, f"model.path={tiny_model}")
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("│")}
    assert sorted(rows) == ["local", "megatron"]
    assert rows["local"].count("1.000") == 2  # local against itself, both passes


@pytest.mark.slow
def test_sigterm_to_torchrun_ends_every_rank(tiny_model_kv2, tmp_path):
    """Slurm's preemption and scancel send SIGTERM: torchrun passes it to its ranks, the driver unwinds
    (prefix worker, logs), and the follower rank, left without its driver, exits too: nothing stays."""
    import signal

    from tests.conftest import TINY
    from tests.helpers import alive, descendant_pids, wait_until

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                             "soup_megatron.cli", "train", "--config", "configs/tiny_cpu.yaml", *TINY,
                             f"model.path={tiny_model_kv2}", "model.tiny.num_kv_heads=2", f"trainer.out_dir={out}",
                             "actor.backend=megatron", "actor.megatron.tensor_parallel=2", "trainer.steps=200"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    assert wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, timeout=300)
    started = descendant_pids(proc.pid)
    assert len(started) >= 3, started  # two ranks and the driver's prefix worker
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert wait_until(lambda: not [pid for pid in started if alive(pid)], timeout=30), \
        [pid for pid in started if alive(pid)]
