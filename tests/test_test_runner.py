"""The test runner's own promises: tools/test.sh runs two pytest-xdist workers with `--dist loadgroup`, and the
tests sharing one fixed cost (a module's SGLang servers, the real model, the one Slurm node) are an xdist group
that one worker runs. pytest 9.2 with pytest-xdist 3.8.0 silently split every group (each worker then started
the module's servers and submitted to the one Slurm node at once); requirements-cpu.txt pins a pair that works."""

import re
import subprocess
import sys

GROUPED = '''
import pytest

GROUP = pytest.mark.xdist_group("shared")

@GROUP
def test_a(): pass

def test_b(): pass

@GROUP
def test_c(): pass

def test_d(): pass

@GROUP
def test_e(): pass
'''


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                           "no:cacheprovider", "-c", "/dev/null", "--rootdir", str(tmp_path), "test_grouped.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    ran = re.findall(r"\[(gw\d)\] .*PASSED test_grouped.py::(test_\w)", done.stdout)
    assert sorted(name for _, name in ran) == ["test_a", "test_b", "test_c", "test_d", "test_e"], done.stdout
    assert len({worker for worker, name in ran if name in ("test_a", "test_c", "test_e")}) == 1, done.stdout
