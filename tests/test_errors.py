"""Every kind of refused input reaches the user as one line on stderr and exit code 2, never a traceback."""

import json
import os
import shutil

import pytest

from soup_megatron.cli import main
from soup_megatron.errors import SoupError, refusals_to_exit_code


def refused(capsys, argv) -> str:
    """Runs the CLI; returns its one stderr line after checking the exit code."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def train(tmp_path, *overrides):
    return ["train", "--config", "configs/tiny_cpu.yaml", f"trainer.out_dir={tmp_path / 'run'}", *overrides]


def test_every_kind_of_bad_input_is_one_line_and_exit_code_2(tiny_model, tmp_path, capsys):
    model = f"model.path={tiny_model}"
    unsupported = tmp_path / "gpt2"
    shutil.copytree(tiny_model, unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2"]}))
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    cases = [
        (train(tmp_path, "soup.nope=1"), "config error: override 'soup.nope=1': unknown key 'soup.nope'"),
        (train(tmp_path, "soup.cut_min=2"), "config error: soup.cut_min=2.0 is not allowed"),
        (train(tmp_path, f"model.path={tmp_path}/nothing"), "not an HF checkpoint directory"),
        (train(tmp_path, "data.source=file", f"data.train_path={tmp_path}/t.jsonl", f"data.heldout_path={tmp_path}/h"),
         "t.jsonl: file not found"),
        (train(tmp_path, "data.arithmetic.min_terms=2", "data.arithmetic.max_terms=2", "data.arithmetic.max_operand=2"),
         "error: data.arithmetic: cannot find 2000 distinct train problems"),
        (["train", "--config", "configs/tiny_cpu.yaml", f"trainer.out_dir={shared}"], "writable by other users"),
        (train(tmp_path, model, "rollout.backend=sglang", "rollout.sglang.python=/nonexistent/python"),
         "rollout.sglang.python=/nonexistent/python: no such interpreter"),
        (train(tmp_path, model, "actor.backend=megatron", "actor.megatron.tensor_parallel=2"),
         "2 processes are needed, and this is one process"),
        (train(tmp_path, f"model.path={unsupported}", "actor.backend=megatron"), "model_type 'gpt2'"),
        (["eval", "--config", "configs/tiny_cpu.yaml", model, "--n", "2", "--k", "1,4"],
         "need n >= 1 and every k <= n"),
    ]
    for argv, message in cases:
        assert message in refused(capsys, argv), argv


def test_a_refusal_message_is_folded_onto_one_line(capsys):
    def body():
        raise SoupError("first line\n  second line")

    assert refusals_to_exit_code(body) == 2
    assert capsys.readouterr().err == "error: first line second line\n"
    with pytest.raises(KeyError):  # anything else is a bug: it keeps its traceback
        refusals_to_exit_code(lambda: {}["missing"])
