import os
from pathlib import Path

import pytest

from soup_megatron.config import load_config

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # configs/ paths in tests are relative to the repository

# The test model solves no problem, and samples of a group whose rewards are all equal are not trained on:
# a reward that differs within a group (the response's length) makes every run of the test model train
VARIED_REWARD = ["reward.type=custom", "reward.function=tests.helpers:length_reward"]
# the test model's shape and a small run; TINY adds the varied reward (a wheel installed elsewhere lacks tests/)
TINY_SHAPE = [
    "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
    "model.tiny.intermediate_size=64", "model.tiny.sft_steps=60", "model.tiny.sft_batch_size=32",
    "data.train_size=200", "data.heldout_size=16", "rollout.prompts_per_step=4", "rollout.group_size=4",
    "rollout.max_response_len=24", "trainer.eval_pass_samples=1", "trainer.tensorboard=false", "trainer.plots=false",
    "trainer.progress=false", "history.interval=2", "history.keep=2", "rollout.threads=1",
]
TINY = [*VARIED_REWARD, *TINY_SHAPE]


def built_once(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    """The tiny model of these overrides, SFT'd once per test session: tools/test.sh runs pytest-xdist
    workers, which share the session's base directory, and the first worker to need a model builds it
    under a lock while the others wait (the model is saved atomically, so a present path is complete)."""
    from filelock import FileLock

    from soup_megatron.model.tiny import prepare_tiny_model

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp()
    root = root.parent if worker else root  # each worker's base is <session>/<worker id>
    path = root / "models" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            prepare_tiny_model(load_config("configs/tiny_cpu.yaml", [*overrides, f"model.path={path}"]), progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A ~50k-parameter Qwen2 + char tokenizer, SFT'd for a few steps: a real HF checkpoint, made in seconds."""
    return built_once(tmp_path_factory, "tiny", TINY)


@pytest.fixture(scope="session")
def tiny_model_kv2(tmp_path_factory):
    """The tiny model with two key/value heads, so it splits over two tensor-parallel ranks."""
    return built_once(tmp_path_factory, "tiny_kv2", [*TINY, "model.tiny.num_kv_heads=2"])


@pytest.fixture(scope="session")
def tiny_model_4_layers(tmp_path_factory):
    """The two-key/value-head tiny model with 4 layers: two pipeline stages x two model chunks of one layer."""
    return built_once(tmp_path_factory, "tiny_4_layers",
                      [*TINY, "model.tiny.num_kv_heads=2", "model.tiny.num_layers=4"])


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory):
    """The tiny model as a Qwen3-MoE: every MLP 4 experts, top-2, two key/value heads."""
    return built_once(tmp_path_factory, "tiny_moe", [*TINY, "model.tiny.num_kv_heads=2", "model.tiny.num_experts=4"])


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The README demo's model (configs/tiny_cpu.yaml: 0.82M parameters, 600 SFT steps); slow tier."""
    return built_once(tmp_path_factory, "demo", [])


@pytest.fixture
def make_config(tiny_model, tmp_path):
    """Config of a tiny run in this test's temporary directory, with extra overrides."""
    def make(*overrides, out="run"):
        return load_config("configs/tiny_cpu.yaml",
                           TINY + [f"model.path={tiny_model}", f"trainer.out_dir={tmp_path / out}", *overrides])
    return make


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_model, tmp_path_factory):
    """The tiny model as a chat checkpoint: a chat template, and a generation config naming two EOS ids
    (the tokenizer's and the newline's), as chat models name an end of turn and an end of text."""
    import json
    import shutil

    from soup_megatron.model.hf import load_tokenizer

    path = tmp_path_factory.mktemp("chat") / "tiny"
    shutil.copytree(tiny_model, path)
    tok = load_tokenizer(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.eos_token_id, tok.encode("\n")[0]], "pad_token_id": tok.eos_token_id}))
    return path
