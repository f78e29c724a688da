"""HF <-> Megatron checkpoint conversion (tools/convert_hf_to_megatron.py, tools/convert_megatron_to_hf.py).

A Megatron checkpoint here is a torch_dist directory: shards that load under any TP/PP layout,
`soup_megatron.json` (architecture, written last) and `hf_config/` (the HF config and tokenizer
files the export needs). Each rank converts only its own slices; run under torchrun / srun with
tp x pp processes, or let `main` start them on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import MegatronConfig
from ..errors import refusals_to_exit_code
from ..io import TMP_MARK, atomic_dir
from ..log import get_logger
from ..model.hf import CheckpointError, HFReader
from . import checkpoint, parallel
from .model import Architecture, check_parallel_sizes, padded_vocab_size, read_architecture
from .weights import build_chunks

log = get_logger(__name__)


def _checkpoint_dtype(hf: Path) -> str:
    reader = HFReader(hf)
    dtype = reader.get(reader.names()[0]).dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise CheckpointError(f"{hf}: weights are {dtype}; float32 and bfloat16 are supported")
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


def _megatron_config(tp: int, pp: int = 1, ep: int = 1, params_dtype: str = "float32") -> MegatronConfig:
    """The layout a conversion runs under: tp x pp x ep ranks (the expert-parallel ones are its data-parallel
    ranks); sequence parallelism, which MoE layers need with tensor parallelism, changes no weight."""
    return MegatronConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, sequence_parallel=tp > 1,
                          params_dtype=params_dtype)


def hf_to_megatron(hf: Path, out: Path, tp: int, pp: int, ep: int = 1) -> None:
    arch = read_architecture(hf)
    mc = _megatron_config(tp, pp, ep, _checkpoint_dtype(hf))
    layout = parallel.initialize(mc)
    models, params = build_chunks(arch, mc, layout)
    checkpoint.load_hf_into(models, params, arch, hf, layout, padded_vocab_size(arch.vocab_size, mc),
                            progress=layout.is_driver)
    tmp = _shared_tmp(out, layout)
    checkpoint.save_distributed(tmp, models, None, layout,
                                {"architecture": asdict(arch), "has_optimizer": False, "source": str(hf),
                                 "params_dtype": mc.params_dtype, "saved_with": {"tp": tp, "pp": pp, "ep": ep}},
                                hf_files_from=hf)
    if layout.is_driver:
        os.replace(tmp, out)
    dist.barrier()


def megatron_to_hf(megatron: Path, out: Path, hf_template: Path | None, tp: int, ep: int = 1) -> None:
    meta = checkpoint.read_metadata(megatron)
    config_dir = hf_template or megatron / checkpoint.HF_CONFIG_DIR
    arch = read_architecture(config_dir)
    saved = asdict(Architecture(**meta["architecture"]))  # fields added since it was saved take their defaults
    if asdict(arch) != saved:
        diff = {k: (saved.get(k), v) for k, v in asdict(arch).items() if saved.get(k) != v}
        raise CheckpointError(f"--hf-template {config_dir} does not describe the model in {megatron}: "
                              + ", ".join(f"{k} is {a} in the checkpoint, {b} in the template"
                                          for k, (a, b) in diff.items()))
    mc = _megatron_config(tp, ep=ep, params_dtype=meta.get("params_dtype", "float32"))
    layout = parallel.initialize(mc)
    models, params = build_chunks(arch, mc, layout)
    checkpoint.load_distributed(megatron, models, None, layout)
    tensors = checkpoint.iter_hf_tensors(models, params, arch, layout, progress=True)
    if layout.is_driver:
        with atomic_dir(out) as tmp:
            checkpoint.write_hf(tmp, tensors, config_dir, is_writer=True)
    else:
        checkpoint.write_hf(out, tensors, config_dir, is_writer=False)
    dist.barrier()


def _shared_tmp(out: Path, layout: parallel.Layout) -> Path:
    """A fresh sibling directory every rank writes into; renamed to `out` when complete."""
    tmp = out.with_name(f"{TMP_MARK}{out.name}")
    if layout.is_driver:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return tmp


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soup_megatron.mcore.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser("hf-to-megatron", help="HF checkpoint -> megatron torch_dist checkpoint")
    to_mcore.add_argument("--hf", required=True, type=Path, help="HF checkpoint directory (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, type=Path, help="new directory for the megatron checkpoint")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks that write the shards")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline stages that write the shards")
    to_mcore.add_argument("--ep", type=int, default=1, help="expert-parallel ranks that write a MoE model's shards")
    to_hf = sub.add_parser("megatron-to-hf", help="megatron checkpoint (converted or saved by training) -> HF")
    to_hf.add_argument("--megatron", required=True, type=Path, help="megatron checkpoint directory")
    to_hf.add_argument("--out", required=True, type=Path, help="new directory for the HF checkpoint")
    to_hf.add_argument("--hf-template", type=Path, default=None,
                       help="HF directory whose config/tokenizer to use (default: the checkpoint's hf_config/)")
    to_hf.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks that load and gather the weights")
    to_hf.add_argument("--ep", type=int, default=1, help="expert-parallel ranks that load a MoE model's experts")
    return parser


def _check(args) -> int:
    """Paths and sizes, before any process starts; returns how many ranks the conversion needs."""
    if args.out.exists():
        raise CheckpointError(f"--out {args.out} already exists; choose a new directory")
    if args.tp < 1 or getattr(args, "pp", 1) < 1 or args.ep < 1:
        raise CheckpointError("--tp, --pp and --ep must be >= 1")
    if args.direction == "hf-to-megatron":
        arch = read_architecture(args.hf)
        if not list(args.hf.glob("*.safetensors")):
            raise CheckpointError(f"--hf {args.hf}: no *.safetensors weights")
        check_parallel_sizes(arch, _megatron_config(args.tp, args.pp, args.ep))
        return args.tp * args.pp * args.ep
    meta = checkpoint.read_metadata(args.megatron)
    if args.hf_template is not None:
        read_architecture(args.hf_template)
    check_parallel_sizes(Architecture(**meta["architecture"]), _megatron_config(args.tp, ep=args.ep))
    return args.tp * args.ep


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    return refusals_to_exit_code(lambda: _convert(args, argv))


def _convert(args, argv: list[str]) -> int:
    ranks = _check(args)
    if ranks > 1 and "WORLD_SIZE" not in os.environ:  # start the ranks here (on a cluster: torchrun / srun)
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={ranks}", "-m", "soup_megatron.mcore.convert", *argv])
    if args.direction == "hf-to-megatron":
        hf_to_megatron(args.hf, args.out, args.tp, args.pp, args.ep)
    else:
        megatron_to_hf(args.megatron, args.out, args.hf_template, args.tp, args.ep)
    log.info(f"wrote {args.out}")  # rank 0 only
    return 0


if __name__ == "__main__":
    sys.exit(main())
