"""The package as cluster users install it (slow tier): a wheel built from this tree, installed with
`pip install` into a fresh venv and run from another folder, with the source tree nowhere on the path.
The fresh venv takes the pinned stack (torch, transformers, ...) from the one tools/setup_env.sh installed
from requirements-cpu.txt, through a path entry, instead of unpacking the same wheels a second time."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from .conftest import ROOT, TINY_SHAPE
from .test_sglang import SGLANG_PYTHON

pytestmark = pytest.mark.slow


def sh(*cmd, cwd, env=None, timeout=900):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.timeout(1800)
def test_the_wheel_installs_and_runs_without_the_source_tree(tmp_path):
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist",
       ROOT, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("soup_megatron-*.whl"))
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    sh(python, "-m", "pip", "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    # the pinned stack after the wheel (pip must not see the editable install of this tree there); a path
    # entry in a .pth file adds that directory alone: its own .pth files (the editable finder) are not run
    site = sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip()
    stack = sysconfig.get_path("purelib")
    assert not (Path(stack) / "soup_megatron").exists(), "the pinned stack holds no copy of this package"
    (Path(site) / "pinned_stack.pth").write_text(stack + "\n")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "configs" / "tiny_cpu.yaml", work / "run.yaml")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cli = [tmp_path / "venv" / "bin" / "soup-megatron"]
    where = sh(python, "-c", "import soup_megatron; print(soup_megatron.__file__)", cwd=work, env=env)
    assert str(tmp_path / "venv") in where and str(ROOT) not in where
    scripts = sh(*cli, "launch", "--config", "run.yaml", "--executor", "slurm", "--dryrun", cwd=work, env=env)
    assert scripts.count("#!/bin/bash") == 1 and "srun" in scripts
    args = [*TINY_SHAPE, "model.path=model", "trainer.out_dir=run", "trainer.steps=2", "trainer.eval_interval=0"]
    sh(*cli, "prepare", "--config", "run.yaml", *args, cwd=work, env=env)
    sh(*cli, "train", "--config", "run.yaml", *args, cwd=work, env=env)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    # an SGLang CPU server started by the installed package (its launcher and stand-ins come from the wheel)
    start = ("import sys; from pathlib import Path; from soup_megatron.config import SGLangConfig; "
             "from soup_megatron.rollout.sglang_servers import RolloutServers, SERVER_PYTHONPATH; "
             "print(SERVER_PYTHONPATH); "
             f"group = RolloutServers(SGLangConfig(python={str(SGLANG_PYTHON)!r}, max_total_tokens=2048), 'model', "
             "Path('sglang-run'), ['policy']).start(); print('healthy'); group.close()")
    out = sh(python, "-c", start, cwd=work, env=env).split()
    assert out[-1] == "healthy" and str(tmp_path / "venv") in out[0]
