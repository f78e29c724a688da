"""Bad configuration and bad data are refused before any work starts, naming what was wrong."""

import json
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from soup_megatron.config import ConfigError, RewardConfig, load_config
from soup_megatron.data.arithmetic import extract_answer, make_split, parse_terms, worked_solution
from soup_megatron.data.prompts import DataError, load_file, load_splits, prompts_for_step
from soup_megatron.reward import build_reward, exact_answer, math_equivalent


@pytest.mark.parametrize("override,message", [
    ("soup.bogus=1", "unknown key 'soup.bogus'. Allowed here: mode, mix_fraction"),
    ("bogus=1", "unknown key 'bogus'"),
    ("trainer.steps=many", "bad value for 'trainer.steps'"),
    ("soup.mix_fraction=1.5", "soup.mix_fraction=1.5 is not allowed; expected a number in [0, 1]"),
    ("soup.mix_fraction=-0.1", "soup.mix_fraction=-0.1 is not allowed"),
    ("history.keep=0", "history.keep=0 is not allowed; expected >= 1"),
    ("soup.prefix_mode=half", "soup.prefix_mode='half' is not allowed; choose one of: clip, decoupled, shaped, mask"),
    ("algo.minibatches=3", "algo.minibatches=3 is not allowed; expected a divisor"),
    ("rollout.group_size=1", "rollout.group_size=1 is not allowed"),
    ("reward.type=custom", "reward.function=''"),
    ("trainer.steps", "must look like key=value"),
    ("algo.adv_eps=0", "algo.adv_eps=0.0 is not allowed; expected > 0"),
    ("actor.grad_clip=-1", "actor.grad_clip=-1.0 is not allowed; expected > 0"),
    ("data.heldout_size=0", "data.heldout_size=0 is not allowed"),
    ("model.tiny.num_kv_heads=3",
     "model.tiny.num_kv_heads=3 is not allowed; expected a divisor of model.tiny.num_heads"),
    ("model.tiny.num_heads=0", "model.tiny.num_heads=0 is not allowed; expected >= 1"),  # before it divides
    ("rollout.weight_sync=distributed", "need CUDA servers and NCCL and are not built in this tree"),
    ("rollout.backend=vllm", "rollout.backend='vllm' is not allowed; choose one of: local, sglang"),
    ("trainer.wandb=off", "choose one of: off, offline, online (YAML reads off, on, yes and no as booleans"),
    ("rollout.sglang.tp=2", "unknown key 'rollout.sglang.tp'. Allowed here: python, servers_from, policy_servers"),
])
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny_cpu.yaml", [override])
    assert message in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["soup.history_per_prompt=5"], "soup.history_per_prompt=5 is not allowed; expected >= 0 and at most the mixed"),
    (["soup.mode=trajectory", "soup.cut_of=max_length"],
     "soup.cut_of='max_length' is not allowed; expected history with soup.mode=trajectory"),
    (["soup.history_steps_per_call=0"], "soup.history_steps_per_call=0 is not allowed; expected >= 1"),
    (["soup.history_placement=colocated"], "expected dedicated unless rollout.backend=sglang"),
    (["soup.history_placement=colocated", "rollout.backend=sglang", "rollout.sglang.history_servers=2"],
     "colocated with rollout.sglang.history_servers equal to policy_servers"),
    (["soup.history_placement=colocated", "rollout.backend=sglang", "rollout.sglang.device=cuda"],
     "history_mem_fraction_static set, summing to <= 0.95"),
    (["rollout.sglang.concurrency=-1"], "expected >= 0 (0 = no client-side cap)"),
])
def test_soup_cost_options_are_validated(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny_cpu.yaml", overrides)
    assert message in str(err.value)
    colocated = ["soup.history_placement=colocated", "rollout.backend=sglang", "rollout.sglang.device=cuda",
                 "rollout.sglang.mem_fraction_static=0.5", "rollout.sglang.history_mem_fraction_static=0.35"]
    assert load_config("configs/tiny_cpu.yaml", colocated).soup.history_placement == "colocated"


def test_cut_min_above_cut_max_is_refused():
    with pytest.raises(ConfigError, match=r"soup.cut_min=0.9 is not allowed; expected at most soup.cut_max"):
        load_config(None, ["soup.cut_min=0.9", "soup.cut_max=0.5"])


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("soup:\n  lookahed: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'soup.lookahed'"):
        load_config(str(bad))
    bad.write_text("algo:\n  loss_agg: seq_sum\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: algo.loss_agg='seq_sum' is not allowed; choose one of: "
                                          r"token_mean, seq_mean_token_mean, seq_mean_token_sum"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_reports_config_error_before_work():
    proc = subprocess.run([sys.executable, "-m", "soup_megatron.cli", "train", "--config", "configs/tiny_cpu.yaml",
                           "soup.cut_min=0.9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: soup.cut_min=0.9 is not allowed" in proc.stderr


def test_overrides_reach_typed_fields():
    cfg = load_config("configs/tiny_cpu.yaml", ["trainer.steps=3", "soup.prefix_clip=0.3", "soup.mix_fraction=0"])
    assert cfg.trainer.steps == 3 and cfg.soup.prefix_clip == 0.3 and cfg.soup.mix_fraction == 0.0


def test_jsonl_and_parquet_loading(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"q": "1+1?", "a": 2}) + "\n\n" + json.dumps({"q": "2+2?", "a": "4"}) + "\n")
    rows = load_file(jl, "q", "a", "Problem: {prompt}\nPut the answer in \\boxed{}.\n")
    assert [(r.text, r.answer) for r in rows] == [("Problem: 1+1?\nPut the answer in \\boxed{}.\n", "2"),
                                                  ("Problem: 2+2?\nPut the answer in \\boxed{}.\n", "4")]
    pqf = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["x?", "y?"], "solution_answer": ["1", "2"]}), pqf)
    assert [r.answer for r in load_file(pqf, "problem", "solution_answer")] == ["1", "2"]


@pytest.mark.parametrize("line,message", [
    ('{"q": "1+1?"}', "p.jsonl:2: missing field 'a' (row has: q)"),
    ('{"q": "1+1?", "a": ""}', "p.jsonl:2: field 'a' is empty"),
    ('{"q": ["x"], "a": "1"}', "p.jsonl:2: field 'q' must be a string or a number, got list"),
    ('{"q": "1+1?", "a": 2', "p.jsonl:2: not valid JSON"),
    ('[1, 2]', "p.jsonl:2: expected an object with field 'q', got list"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"q": "ok?", "a": "1"}) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_file(f, "q", "a")
    assert message in str(err.value)


def test_missing_and_wrong_kind_of_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_file(tmp_path / "none.jsonl", "q", "a")
    (tmp_path / "x.csv").write_text("q,a\n")
    with pytest.raises(DataError, match="expected a .jsonl or .parquet"):
        load_file(tmp_path / "x.csv", "q", "a")


def test_builtin_task_splits_are_disjoint_and_seeded():
    train = make_split("train", 300, 1, 3, 5, 9)
    held = make_split("heldout", 100, 1, 3, 5, 9)
    assert not {p.text for p in train} & {p.text for p in held}
    assert make_split("train", 300, 1, 3, 5, 9) == train
    assert make_split("train", 300, 2, 3, 5, 9) != train
    for p in train[:20]:
        solution = worked_solution(parse_terms(p.text))
        assert extract_answer(solution) == p.answer
        assert exact_answer(solution, p.answer) == 1.0
    assert worked_solution([3, 4, 5]) == "3+4=7\n7+5=12\nA: 12"
    slipped = [worked_solution([3, 4, 5], random.Random(i), 1.0) for i in range(20)]
    assert all(not s.startswith("3+4=7\n") for s in slipped)  # every step is off by one or two


def test_step_order_is_deterministic_and_covers_epochs():
    prompts = make_split("train", 10, 1, 3, 3, 9)
    seen = [p.uid for s in range(5) for p in prompts_for_step(prompts, s, 4, seed=7)]
    assert seen == [p.uid for s in range(5) for p in prompts_for_step(prompts, s, 4, seed=7)]
    assert sorted(seen[:10]) == sorted(p.uid for p in prompts)  # first epoch is a permutation


def test_rewards():
    assert exact_answer("1+2=3\nA: 3", "3") == 1.0
    assert exact_answer("1+2=3\nA: 4", "3") == 0.0
    assert exact_answer("no answer line", "3") == 0.0
    assert math_equivalent("so the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_equivalent("The answer is $\\frac{2}{4}$", "\\frac12") == 1.0
    assert math_equivalent("x = 3", "4") == 0.0
    custom = build_reward(RewardConfig(type="custom", function="tests.helpers:length_reward"))
    assert custom("abcd", "x") == 4.0
    with pytest.raises(ConfigError, match="cannot import module 'nope'"):
        build_reward(RewardConfig(type="custom", function="nope:f"))
    with pytest.raises(ConfigError, match="has no callable 'missing'"):
        build_reward(RewardConfig(type="custom", function="tests.helpers:missing"))


def test_cli_names_a_missing_model_or_data_file(tmp_path):
    for args, message in (
        ([f"model.path={tmp_path}/nothing"], "not an HF checkpoint directory (no config.json)"),
        ([f"model.path={tmp_path}/nothing", "data.source=file", f"data.train_path={tmp_path}/t.jsonl",
          f"data.heldout_path={tmp_path}/h.jsonl"],
         "t.jsonl: file not found"),
    ):
        proc = subprocess.run([sys.executable, "-m", "soup_megatron.cli", "train", "--config", "configs/tiny_cpu.yaml",
                               f"trainer.out_dir={tmp_path}/run", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_run_directory_must_be_private_to_the_user(tmp_path, capsys):
    """A run refuses a directory others can write to, or one that belongs to someone else."""
    import os

    from soup_megatron.cli import main
    from soup_megatron.io import make_private_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(PermissionError, match="writable by other users"):
        make_private_dir(shared)
    assert main(["train", "--config", "configs/tiny_cpu.yaml", f"trainer.out_dir={shared}"]) == 2
    assert "writable by other users" in capsys.readouterr().err
    if os.getuid() == 0:  # only root can give a folder away
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(PermissionError, match="belongs to user id 65534"):
            make_private_dir(foreign)
    readable = make_private_dir(tmp_path / "new" / "run")
    assert readable.stat().st_mode & 0o777 == 0o700


def test_prompt_format_uses_the_checkpoints_chat_template(tiny_chat_model, tiny_model):
    from soup_megatron.config import DataConfig
    from soup_megatron.data.encoding import PromptFormat
    from soup_megatron.model.hf import load_tokenizer

    tok = load_tokenizer(tiny_chat_model)
    plain = PromptFormat.of(tok, DataConfig())
    assert plain.prompt_ids("3+4=?\n") == tuple(tok.encode("3+4=?\n"))
    chat = PromptFormat.of(tok, DataConfig(chat_template=True, system_prompt="Add."))
    expected = tok.apply_chat_template([{"role": "system", "content": "Add."}, {"role": "user", "content": "3+4=?"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.prompt_ids("3+4=?") == tuple(expected)
    assert tok.decode(list(chat.prompt_ids("3+4=?"))) == "<|system|>Add.\n<|user|>3+4=?\n<|assistant|>"
    assert chat.response_text(tok.encode("7") + [tok.eos_token_id]) == "7"
    with pytest.raises(ConfigError, match="has no chat template"):
        PromptFormat.of(load_tokenizer(tiny_model), DataConfig(chat_template=True), str(tiny_model))
    with pytest.raises(ConfigError, match="data.system_prompt"):
        load_config("configs/tiny_cpu.yaml", ["data.system_prompt=Be brief."])


def test_arithmetic_question_style_asks_in_words_over_the_same_split():
    worked = make_split("heldout", 30, 1, 2, 3, 20)
    asked = make_split("heldout", 30, 1, 2, 3, 20, style="question")
    assert [p.answer for p in asked] == [p.answer for p in worked]
    for w, q in zip(worked, asked):
        terms = parse_terms(w.text)
        assert q.text == f"What is {' + '.join(map(str, terms))}?" and q.answer == str(sum(terms))
    cfg = load_config("configs/smollm2_135m_cpu.yaml")
    train, held = load_splits(cfg.data, cfg.seed)
    assert len(train) == cfg.data.train_size and len(held) == cfg.data.heldout_size
    assert not {p.text for p in train} & {p.text for p in held}
    assert train[0].text.endswith("? Put the final answer in \\boxed{}.")
    with pytest.raises(ConfigError, match="data.arithmetic.style"):
        load_config("configs/tiny_cpu.yaml", ["data.arithmetic.style=essay"])
