"""Weights in and out of the megatron model.

- HF -> model: each rank reads only the HF tensors of its own parameters, one at a time.
- model -> HF: tensors are gathered from the tensor-parallel ranks one parameter at a time (a MoE
  expert's also from the expert-parallel ranks, the same local expert of each at once) and written by
  rank 0 in safetensors shards of bounded size (the full model never sits in one rank's memory besides
  its own slice).
- Distributed checkpoints (megatron `torch_dist`): model, megatron's optimizer state (fp32 main
  weights, Adam moments; saved per parameter, so a checkpoint loads under another TP/PP/DP layout),
  per-rank RNG state and metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..model.hf import CheckpointError, HFReader, copy_side_files
from .model import Architecture
from .parallel import Layout
from .weights import ParamMap, expert_name, hf_names, iter_local, stage_params, to_hf, to_megatron

SHARD_BYTES = 2 * 1024 ** 3
DIST_MARKER = "soup_megatron.json"  # written last into a distributed checkpoint: its presence means complete
HF_CONFIG_DIR = "hf_config"  # HF config and tokenizer files inside a distributed checkpoint, for exports
# the distributed optimizer's state saved per parameter, so it loads under another TP/PP/DP layout
OPTIMIZER_LAYOUT = {"distrib_optim_sharding_type": "dp_reshardable"}


def load_hf_into(models: list, params: list[list[ParamMap]], arch: Architecture, hf_dir: Path, layout: Layout,
                 padded_vocab: int, progress: bool = False) -> None:
    """Fill this rank's model chunks (`params[i]` maps `models[i]`) from an HF checkpoint."""
    reader = HFReader(hf_dir)
    local = [pair for model, chunk in zip(models, params) for pair in iter_local(model, chunk)]
    with torch.no_grad():
        for p, param in tqdm(local, desc="loading HF weights", disable=not progress):
            value = to_megatron(p, [reader.get(n) for n in p.hf], arch, layout.tp_rank, layout.tp, padded_vocab)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{hf_dir}: {p.hf} give shape {tuple(value.shape)} for {p.megatron}, "
                                      f"the model has {tuple(param.shape)}")
            param.copy_(value)


def iter_hf_tensors(models: list, params: list[list[ParamMap]], arch: Architecture, layout: Layout,
                    progress: bool = False) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(HF name, full tensor) on global rank 0, (HF name, None) elsewhere; every rank must iterate to
    the end. Model chunk by chunk in layer order, the ranks of data-parallel replica 0 gather each
    parameter's tensor-parallel slices; a later pipeline stage sends the HF tensors to rank 0, one
    parameter at a time."""
    from .model import transformer_engine_available

    te_spec = transformer_engine_available()
    bar = tqdm(total=len(hf_names(arch)), desc="exporting HF weights", disable=not (progress and layout.is_driver))
    for chunk, stage in ((c, s) for c in range(layout.vp) for s in range(layout.pp)):
        mine = stage == layout.pp_rank
        piece = params[chunk] if mine else stage_params(arch, stage, layout.pp, te_spec, chunk, layout.vp)
        exported = [p for p in piece  # the first chunk exports a tied embedding
                    if not (arch.tied_embeddings and p.megatron == "output_layer.weight")]
        if mine:
            own = {p.megatron: tensor for p, tensor in iter_local(models[chunk], params[chunk])}
            exporter = layout.dp_rank == 0 and layout.cp_rank == 0 and layout.tp_rank == 0
            for p in exported:
                gather = _gather_hf if p.expert is None else _gather_experts
                named = gather(p, own[p.megatron], arch, layout)
                if stage > 0 and exporter:
                    _send_to_driver(named)
                bar.update(len(named))
                yield from (named if layout.is_driver else ((name, None) for name, _ in named))
        elif layout.is_driver:
            expected = sum(len(p.hf) for p in exported)  # the stage's names, all experts included
            while expected:
                named = _receive_from_stage(stage)
                expected -= len(named)
                bar.update(len(named))
                yield from named
    bar.close()


def _gather_hf(p: ParamMap, local: torch.Tensor, arch: Architecture, layout: Layout
               ) -> list[tuple[str, Optional[torch.Tensor]]]:
    """(HF name, tensor) of `p`, the tensors on tensor-parallel rank 0 of replica 0, context-parallel rank 0
    (copies: callers may keep them while training goes on), None elsewhere."""
    from megatron.core import parallel_state as ps

    if layout.dp_rank != 0 or layout.cp_rank != 0:
        return [(name, None) for name in p.hf]
    local = local.detach()
    if layout.tp > 1 and p.kind != "replicated":
        shards = [torch.empty_like(local) for _ in range(layout.tp)]
        dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    else:
        shards = [local.clone()] * layout.tp
    tensors = to_hf(p, [s.cpu() for s in shards], arch) if layout.tp_rank == 0 else [None] * len(p.hf)
    return list(zip(p.hf, tensors))


def _gather_experts(p: ParamMap, local: torch.Tensor, arch: Architecture, layout: Layout
                    ) -> list[tuple[str, Optional[torch.Tensor]]]:
    """(HF name, tensor) of local expert `p.expert` of every expert-parallel rank: the tensor-parallel slices
    are gathered, then the expert-parallel ranks exchange their HF tensors. Every rank takes part (the
    expert-parallel ranks are data- or context-parallel ones); the tensors are on the exporting rank
    (tensor-, data- and context-parallel rank 0, which is expert-parallel rank 0), None elsewhere."""
    from megatron.core import parallel_state as ps

    local = local.detach()
    if layout.tp > 1:
        shards = [torch.empty_like(local) for _ in range(layout.tp)]
        dist.all_gather(shards, local.contiguous(), group=ps.get_expert_tensor_parallel_group())
    else:
        shards = [local.clone()]
    tensors = [t.contiguous() for t in to_hf(p, [s.cpu() for s in shards], arch)]
    per_rank = [tensors]
    if layout.ep > 1:
        per_rank = [[torch.empty_like(t) for t in tensors] for _ in range(layout.ep)]
        for i, t in enumerate(tensors):
            dist.all_gather([theirs[i] for theirs in per_rank], t, group=ps.get_expert_model_parallel_group())
    exporter = layout.dp_rank == 0 and layout.cp_rank == 0 and layout.tp_rank == 0
    if exporter and layout.ep_rank != 0:
        raise RuntimeError(f"rank {layout.rank} exports the weights and is expert-parallel rank {layout.ep_rank}, "
                           "not 0")
    per_expert = arch.num_experts // layout.ep
    return [(expert_name(name, ep_rank * per_expert + p.expert), t if exporter else None)
            for ep_rank, theirs in enumerate(per_rank) for name, t in zip(p.hf, theirs)]


def _wire_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _send_to_driver(named: list[tuple[str, torch.Tensor]]) -> None:
    dist.send_object_list([[(name, t.shape, t.dtype) for name, t in named]], dst=0)
    for _, t in named:
        dist.send(t.to(_wire_device()), dst=0)


def _receive_from_stage(stage: int) -> list[tuple[str, torch.Tensor]]:
    from megatron.core import parallel_state as ps

    sender = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[stage]
    header = [None]
    dist.recv_object_list(header, src=sender)
    out = []
    for name, shape, dtype in header[0]:
        t = torch.empty(shape, dtype=dtype, device=_wire_device())
        dist.recv(t, src=sender)
        out.append((name, t.cpu()))
    return out


def write_hf(path: Path, tensors: Iterator[tuple[str, Optional[torch.Tensor]]], side_files_from: Path,
             is_writer: bool, shard_bytes: int = SHARD_BYTES) -> None:
    """Write streamed tensors as safetensors shards with an index (HF's sharded layout) plus config and
    tokenizer files. Only `is_writer` writes; the other ranks just drive the collective iteration."""
    from safetensors.torch import save_file

    path = Path(path)
    shard: dict[str, torch.Tensor] = {}
    files: list[dict[str, torch.Tensor]] = []
    weight_map: dict[str, str] = {}
    size = 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            files.append({})
            shard, size = {}, 0

    for name, tensor in tensors:
        if not is_writer:
            continue
        path.mkdir(parents=True, exist_ok=True)
        if size and size + tensor.numel() * tensor.element_size() > shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
    if not is_writer:
        return
    path.mkdir(parents=True, exist_ok=True)
    if not files and len(shard) and size <= shard_bytes:
        save_file(shard, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        flush()
        total = sum((path / f).stat().st_size for f in set(weight_map.values()))
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    copy_side_files(side_files_from, path)


def model_state(models: list) -> dict:
    """The sharded state of this rank's model chunks. megatron keys every tensor by its global layer, so the
    nesting per chunk is only the shape of the returned dict: a checkpoint loads under any layout."""
    return {f"chunk{i}": model.sharded_state_dict(prefix="") for i, model in enumerate(models)}


def save_distributed(path: Path, models: list, optimizer, layout: Layout, metadata: dict,
                     hf_files_from: Path) -> None:
    """A megatron torch_dist checkpoint of the model and of megatron's optimizer (fp32 main weights and
    Adam state; both resharded on load with another layout), each rank's RNG state, the HF
    config/tokenizer files of `hf_files_from`, and `soup_megatron.json` written last."""
    from megatron.core import dist_checkpointing

    from .cpu_compat import cuda_on_cpu

    path = Path(path)
    if layout.is_driver:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {"model": model_state(models)}
    if optimizer is not None:  # its view is built on a second copy of the model's sharded tensors
        with cuda_on_cpu():
            state["optimizer"] = optimizer.sharded_state_dict(model_state(models), is_loading=False,
                                                              metadata=OPTIMIZER_LAYOUT)
        state["adam_step"] = _adam_step(optimizer)
    dist_checkpointing.save(state, str(path))
    if optimizer is not None:  # a training checkpoint: each rank's random state too
        rng = path / "rng"
        if layout.is_driver:
            rng.mkdir(exist_ok=True)
        dist.barrier()
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   rng / f"rank{layout.rank:05d}.pt")
    dist.barrier()
    if layout.is_driver:
        (path / HF_CONFIG_DIR).mkdir(exist_ok=True)
        copy_side_files(hf_files_from, path / HF_CONFIG_DIR)
        (path / DIST_MARKER).write_text(json.dumps(metadata, indent=1))


def is_distributed_checkpoint(path: Path) -> bool:
    return (Path(path) / DIST_MARKER).is_file()


def read_metadata(path: Path) -> dict:
    path = Path(path)
    if not is_distributed_checkpoint(path):
        raise CheckpointError(f"{path}: not a complete soup-megatron distributed checkpoint (no {DIST_MARKER}; "
                              "an interrupted save leaves none)")
    return json.loads((path / DIST_MARKER).read_text())


def load_distributed(path: Path, models: list, optimizer, layout: Layout) -> dict:
    """Load the model chunks (and optimizer, when given) under the current layout; returns the metadata."""
    from megatron.core import dist_checkpointing

    from .cpu_compat import cuda_on_cpu

    path = Path(path)
    metadata = read_metadata(path)
    state = {"model": model_state(models)}
    if optimizer is not None:
        if not metadata.get("has_optimizer"):
            raise CheckpointError(f"{path}: holds no optimizer state (a converted model, not a training checkpoint)")
        _give_adam_states(optimizer)
        with cuda_on_cpu():
            state["optimizer"] = optimizer.sharded_state_dict(model_state(models), is_loading=True,
                                                              metadata=OPTIMIZER_LAYOUT)
        state["adam_step"] = 0.0
    loaded = dist_checkpointing.load(state, str(path))
    for i, model in enumerate(models):
        model.load_state_dict(loaded["model"][f"chunk{i}"], strict=False)
    if optimizer is not None:
        with cuda_on_cpu(), torch.no_grad():  # it copies into the main weights in place
            optimizer.load_state_dict(loaded["optimizer"])
        for param_state in _torch_adam_states(optimizer):
            if "step" in param_state:  # one tensor each: Adam increments them in place
                param_state["step"] = torch.tensor(loaded["adam_step"], dtype=torch.float32)
        rng = path / "rng" / f"rank{layout.rank:05d}.pt"
        if rng.is_file():  # a checkpoint saved with fewer ranks has none for this one
            saved = torch.load(rng, weights_only=False)
            torch.set_rng_state(saved["cpu"])
            if saved["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(saved["cuda"])
    return metadata


def _torch_adam_states(optimizer):
    """Per-parameter states of the torch Adam optimizers inside megatron's (chained) optimizer."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield from part.optimizer.state.values()


def _give_adam_states(optimizer) -> None:
    """Zero Adam state (step 0) for every parameter that has none, as in a fresh process before its first
    step: megatron-core 0.16's distributed optimizer reads the step of the existing state while building
    its view of the checkpoint to load, and fails on an empty one. The load then overwrites it."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = part.optimizer
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}


def _adam_step(optimizer) -> float:
    """torch Adam's per-parameter step count (all equal: every parameter is updated every step). Saved
    apart because megatron-core 0.16's distributed optimizer does not restore it on load."""
    steps = {float(st["step"]) for st in _torch_adam_states(optimizer) if "step" in st}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on Adam's step count: {sorted(steps)}")
    return steps.pop() if steps else 0.0
