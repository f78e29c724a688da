"""tools/plan_memory.py: exact parameter counts, published bytes per parameter, activation formulas, refusals."""

import subprocess
import sys
from pathlib import Path

import pytest

from soup_megatron.config import MegatronConfig
from soup_megatron.mcore.model import padded_vocab_size
from soup_megatron.planning.memory import (
    bytes_per_parameter,
    layer_activation_bytes,
    main,
    microbatches_in_flight,
    parameter_counts,
    read_architecture,
)

ROOT = Path(__file__).resolve().parents[1]
QWEN = "configs/architectures/qwen2.5-math-7b.json"
LLAMA = "configs/architectures/llama-3-70b.json"
FITS_70B = ["actor.megatron.tensor_parallel=8", "actor.megatron.pipeline_parallel=4",
            "actor.megatron.params_dtype=bfloat16", "actor.megatron.recompute=selective", "actor.micro_batch_size=1"]


def test_parameter_counts_of_the_published_models():
    # Qwen2.5-Math-7B (the Qwen2.5-7B architecture): h=3584, ffn=18944, 28 layers, 28 heads, 4 kv heads of 128,
    # vocabulary 152064, untied; qkv carries a bias
    qwen_layer = (3584 * (28 + 2 * 4) * 128 + (28 + 2 * 4) * 128  # qkv weight + bias
                  + 28 * 128 * 3584 + 3 * 3584 * 18944 + 2 * 3584)  # o-proj, SwiGLU MLP, two RMSNorms
    qwen = 2 * 152064 * 3584 + 28 * qwen_layer + 3584
    assert qwen == 7_615_616_512
    # Llama-3-70B: h=8192, ffn=28672, 80 layers, 64 heads, 8 kv heads of 128, vocabulary 128256, untied, no bias
    llama_layer = 8192 * (64 + 2 * 8) * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672 + 2 * 8192
    llama = 2 * 128256 * 8192 + 80 * llama_layer + 8192
    assert llama == 70_553_706_496

    for path, expected, published in [(QWEN, qwen, 7.62e9), (LLAMA, llama, 70_553_706_496)]:
        arch = read_architecture(Path(path))
        total = parameter_counts(arch, arch.vocab_size).total
        assert total == expected
        assert abs(total - published) / published < 0.005


def test_llama_70b_split_over_gpus():
    arch = read_architecture(Path(LLAMA))
    padded = padded_vocab_size(arch.vocab_size, MegatronConfig(tensor_parallel=8))
    assert padded == 126 * 1024 == 129024  # ceil(128256 / (128 * 8)) * 128 * 8
    counts = parameter_counts(arch, padded)
    layer_per_gpu = (8192 * 80 * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672) // 8 + 2 * 8192  # norms replicated
    embedding_per_gpu = 129024 * 8192 // 8
    # tp=8, pp=1: every layer, the embedding, the output layer and the final norm on each GPU
    assert counts.on_stage(0, tp=8, pp=1) == 80 * layer_per_gpu + 2 * embedding_per_gpu + 8192 == 8_821_940_224
    # tp=8, pp=4: 20 layers per stage; the embedding on the first, the output layer and final norm on the last
    assert counts.on_stage(0, tp=8, pp=4) == 20 * layer_per_gpu + embedding_per_gpu == 2_271_543_296
    assert counts.on_stage(3, tp=8, pp=4) == 20 * layer_per_gpu + embedding_per_gpu + 8192
    assert counts.on_stage(1, tp=8, pp=4) == 20 * layer_per_gpu


def test_qwen3_30b_a3b_counts_every_expert_and_computes_with_eight(capsys):
    """Qwen3-30B-A3B: h=2048, 48 layers, 32 heads and 4 kv heads of 128, q/k norms, 128 experts of 3 x 2048 x 768,
    top-8, a router per layer, vocabulary 151936, untied: 30.5 B parameters, 3.3 B active (its model card)."""
    arch = read_architecture(Path("configs/architectures/qwen3-30b-a3b.json"))
    attention = 2048 * (32 + 2 * 4) * 128 + 32 * 128 * 2048
    replicated = 2 * 2048 + 2 * 128 + 128 * 2048  # two RMSNorms, q/k norms, the router
    experts = 128 * 3 * 2048 * 768
    counts = parameter_counts(arch, arch.vocab_size)
    assert counts.total == 2 * 151936 * 2048 + 48 * (attention + replicated + experts) + 2048 == 30_532_122_624
    assert counts.active == counts.total - 48 * experts * 120 // 128 == 3_353_032_704
    # the recipe's trainer GPU: every layer's attention and router, 16 of the 128 experts (EP=8)
    on_gpu = 2 * 151936 * 2048 + 48 * (attention + replicated + experts // 8) + 2048
    assert counts.on_stage(0, tp=1, pp=1, ep=8) == on_gpu
    assert main(["--config", "configs/qwen3_30b_a3b_4x8xh100.yaml", "--architecture",
                 "configs/architectures/qwen3-30b-a3b.json", "--world-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "3.35 B active: top-8 of 128 experts" in out and "experts / 2" in out and "routing replay" in out


def test_bytes_per_parameter():
    def total(*args):
        return sum(bytes_per_parameter(*args).values())

    # Megatron-LM docs, "Distributed Optimizer": bf16 params + fp32 grads 18 undistributed, 6 + 12/d distributed;
    # fp32 params + fp32 grads 16 and 8 + 8/d
    assert total(False, "bfloat16", 8) == 18
    assert total(True, "bfloat16", 1) == 18
    assert total(True, "bfloat16", 8) == 6 + 12 / 8 == 7.5
    assert total(False, "float32", 4) == 16
    assert total(True, "float32", 4) == 8 + 8 / 4


def test_activation_formulas():
    s, b, h, a, t = 2048, 1, 4096, 32, 8
    sbh = s * b * h
    assert layer_activation_bytes(s, b, h, a, t, True, "selective", "bfloat16") == 34 * sbh / t
    assert layer_activation_bytes(s, b, h, a, t, False, "selective", "bfloat16") == sbh * (10 + 24 / t)
    assert layer_activation_bytes(s, b, h, a, t, True, "none", "bfloat16") == sbh * (34 / t + 5 * a * s / (h * t))
    assert layer_activation_bytes(s, b, h, a, t, False, "none", "bfloat16") == sbh * (10 + 3 + 10)  # 24/8, 5as/(ht)
    assert layer_activation_bytes(s, b, h, a, t, True, "full", "bfloat16") == 2 * sbh
    assert layer_activation_bytes(s, b, h, a, t, True, "selective", "float32") == 2 * 34 * sbh / t

    # GPT-3 175B shape: what selective recompute saves is the 5as/h term against 34
    s, h, a = 2048, 12288, 96
    assert 5 * a * s / h == 80
    ratio = (layer_activation_bytes(s, 1, h, a, 8, True, "none", "bfloat16")
             / layer_activation_bytes(s, 1, h, a, 8, True, "selective", "bfloat16"))
    assert ratio == pytest.approx(1 + 5 * a * s / (34 * h)) == pytest.approx(114 / 34)


def test_microbatches_in_flight():
    assert [microbatches_in_flight(stage, 4, 1) for stage in range(4)] == [4, 3, 2, 1]
    assert microbatches_in_flight(0, 4, 2) == 4 * (1 + 3 / (4 * 2))  # the paper's interleaving factor
    assert microbatches_in_flight(0, 1, 1) == 1


def run_tool(*args):
    return subprocess.run([sys.executable, "tools/plan_memory.py", "--config", "configs/tiny_cpu.yaml", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_refuses_70b_on_8_gpus_and_accepts_128():
    refused = run_tool("--architecture", LLAMA, "actor.megatron.tensor_parallel=8")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "more than --gpu-memory-gib 80; the biggest term is activations" in refused.stderr
    assert "actor.megatron.recompute" in refused.stderr  # what to change

    fits = run_tool("--architecture", LLAMA, *FITS_70B, "--world-size", "128")
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "first stage" in fits.stdout and "last stage" in fits.stdout and "d=4" in fits.stdout


def plan(capsys, *args):
    code = main(["--config", "configs/tiny_cpu.yaml", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_refusals(capsys, tmp_path):
    code, _, err = plan(capsys, "--architecture", "configs/architectures/missing.json")
    assert code == 2 and "configs/architectures/missing.json does not exist" in err

    (tmp_path / "broken.json").write_text('{"model_type": "llama",')
    code, _, err = plan(capsys, "--architecture", str(tmp_path / "broken.json"))
    assert code == 2 and f"{tmp_path / 'broken.json'}: not an HF model config" in err
    (tmp_path / "gpt2.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    code, _, err = plan(capsys, "--architecture", str(tmp_path / "gpt2.json"))
    assert code == 2 and f"{tmp_path / 'gpt2.json'}: model_type 'gpt2'" in err and "not supported" in err

    code, _, err = plan(capsys, "model.path=/nowhere")
    assert code == 2 and "/nowhere/config.json does not exist" in err

    code, _, err = plan(capsys, "--architecture", LLAMA, "actor.megatron.tensor_parallel=4", "--world-size", "6")
    assert code == 2
    assert "--world-size 6 is not a multiple of tensor_parallel 4 x pipeline_parallel 1 x context_parallel 1 = 4 " \
           "(6 / 4 = 1.50)" in err

    code, _, err = plan(capsys, "--architecture", QWEN, "actor.megatron.tensor_parallel=8")
    assert code == 2 and "does not divide the model's num_attention_heads=28 (28 / 8 = 3.50)" in err

    code, _, err = plan(capsys, "--architecture", LLAMA, "actor.megatron.no_such_key=1")
    assert code == 2 and "unknown key" in err

    sglang = ["--architecture", LLAMA, *FITS_70B, "--world-size", "64",
              "rollout.backend=sglang", "rollout.sglang.dtype=bfloat16"]
    code, _, err = plan(capsys, *sglang, "rollout.sglang.tp_size=1")  # 70.55e9 x 2 bytes = 131.42 GiB > 0.85 x 80 GiB
    assert code == 2 and "SGLang: weights (131.42 GiB per GPU" in err and "raise rollout.sglang.tp_size" in err
    code, out, err = plan(capsys, *sglang, "rollout.sglang.tp_size=8")
    assert code == 0, err
    assert "KV cache per token" in out and "40 KiB" in out  # 2 x 80 layers x 1 kv head x 128 x 2 bytes
    # colocated history servers have their own share of each GPU: 17.6 GiB of weights do not fit 0.2 x 80 GiB
    colocated = [*sglang, "rollout.sglang.tp_size=8", "soup.history_placement=colocated",
                 "rollout.sglang.device=cuda", "rollout.sglang.mem_fraction_static=0.5"]
    code, out, err = plan(capsys, *colocated, "rollout.sglang.history_mem_fraction_static=0.2")
    assert code == 2 and "SGLang history servers, beside the policy servers: weights (16.43 GiB" in err
    assert "rollout.sglang.history_mem_fraction_static" in err
    code, out, err = plan(capsys, *colocated, "rollout.sglang.history_mem_fraction_static=0.35")
    assert code == 0, err
    assert "SGLang policy servers" in out and "mem_fraction_static=0.35" in out
