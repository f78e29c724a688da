"""The megatron actor on a CUDA GPU: one rank, NCCL, megatron-core's local layer spec (no Transformer Engine
unless it imports). Marker `gpu`: in neither the default nor the slow tier (CI has no GPU). On a GPU machine:

    python -m pytest -m gpu tests/test_gpu.py

On CPU, `-m gpu` skips these with that reason. What the CPU tiers check with gloo ranks (tests/test_megatron.py)
is checked here with the model on the GPU, against HF on the same GPU and the local actor on the CPU.
"""

import json

import pytest
import torch

from tests.test_megatron import assert_parity, families, run  # noqa: F401 (families: a fixture used here)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_megatron_logits_on_gpu_equal_hf_logits(families, tmp_path):  # noqa: F811
    run("tests/mcore_ranks.py", "logits", *families.values(), "--tp", 1, "--out", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    print(result)
    assert sorted(result) == sorted(families)
    for family, r in result.items():
        assert r["max_abs_diff"] < 1e-4, (family, r)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe-replay"])
def test_megatron_actor_on_gpu_matches_local_actor_on_cpu(tiny_model_kv2, tiny_moe_model, tmp_path, moe):
    """One SOUP update on the GPU (log-probs, loss, gradients, Adam update, save/resume) equals the local
    actor's on the CPU; the MoE model's tokens go through megatron's alltoall dispatcher on its CUDA streams,
    replaying a given routing."""
    run("tests/mcore_ranks.py", "actor", tiny_moe_model if moe else tiny_model_kv2, "--tp", 1,
        *(["--replay"] if moe else []), "--out", tmp_path / "r.json", "--work", tmp_path)
    r = json.loads((tmp_path / "r.json").read_text())
    print(r)
    assert_parity(r, sp=False, nothing_sharded=True, **({"compared": 0.8, "tied": False} if moe else {}))
    if moe:
        assert r["replay_moved_logp"] > 1e-3 and r["routing_differs_at"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_soup_run_with_megatron_actor_on_gpu(tiny_moe_model, tmp_path, dtype):
    """`soup-megatron train actor.backend=megatron` on one GPU (the in-process engine rolls out on the CPU and
    gets the GPU's weights each step) trains, checkpoints, resumes and reports its GPU memory."""
    from tests.conftest import TINY

    args = ["-m", "soup_megatron.cli", "train", "--config", "configs/tiny_cpu.yaml", *TINY,
            f"model.path={tiny_moe_model}", "model.tiny.num_kv_heads=2", "model.tiny.num_experts=4",
            f"trainer.out_dir={tmp_path / 'run'}", "actor.backend=megatron", f"actor.megatron.params_dtype={dtype}",
            "actor.routing_replay=rollout", "trainer.eval_interval=0", "trainer.save_interval=2"]
    run(*args, "trainer.steps=2")
    run(*args, "trainer.steps=3")  # resumes from step 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    print(trained)
    assert [r["step"] for r in trained] == [1, 2, 3]
    assert all(r["megatron/gpu_peak_gib"] > 0 for r in trained)
    # the engine's fp32 weights are the actor's: equal in fp32, within bf16 rounding of the logits in bf16
    assert all(r["logp_gap/max"] < (1e-4 if dtype == "float32" else 0.5) for r in trained)
    assert all(r["moe/routing_given_share"] == 1.0 for r in trained)
