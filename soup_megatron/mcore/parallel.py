"""Process groups for the megatron actor: torch.distributed from the launcher's environment
(torchrun or srun set RANK / WORLD_SIZE), then megatron's tensor/pipeline/context/data groups."""

from __future__ import annotations

import math
import os
import socket
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..config import MegatronConfig
from ..errors import SoupError


class ParallelError(SoupError, ValueError):
    """Parallel sizes that do not fit the processes or the batch."""


@dataclass(frozen=True)
class Layout:
    rank: int
    world: int
    tp: int
    pp: int
    vp: int  # model chunks per pipeline rank (the interleaved schedule when > 1)
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int  # replica index: the context-parallel ranks of a replica share it (and its samples)
    cp_rank: int
    ep: int = 1  # expert-parallel ranks (a mixture-of-experts model's experts split over them)
    ep_rank: int = 0

    @property
    def is_driver(self) -> bool:
        """Global rank 0 runs the trainer loop; the other ranks follow its commands."""
        return self.rank == 0


def context_parallel_positions(length: int, rank: int, size: int) -> torch.Tensor:
    """Global positions of the `length // size` tokens context-parallel rank `rank` of `size` holds in a
    sequence of `length` (a multiple of 2 size): chunks `rank` and `2 size - 1 - rank` of 2 size equal
    chunks, megatron's split (causal attention costs every rank the same)."""
    chunk = length // (2 * size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in (rank, 2 * size - 1 - rank)])


@dataclass(frozen=True)
class SequenceSlice:
    """The positions of a microbatch one rank computes: all of them, or with context parallelism its
    `context_parallel_positions`; the sequence is right-padded to a multiple of 2 cp (with context
    parallelism) times tp (with sequence parallelism)."""
    padded: int
    index: torch.Tensor

    @classmethod
    def of(cls, width: int, layout: "Layout", sequence_parallel: bool = False) -> "SequenceSlice":
        """With sequence parallelism the tensor-parallel ranks also split the rank's positions between
        layers, so those must be a multiple of tp."""
        split = (2 * layout.cp if layout.cp > 1 else 1) * (layout.tp if sequence_parallel else 1)
        padded = -(-width // split) * split
        if layout.cp == 1:
            return cls(padded, torch.arange(padded))
        return cls(padded, context_parallel_positions(padded, layout.cp_rank, layout.cp))

    def take(self, t: torch.Tensor | None, device) -> torch.Tensor | None:
        """This rank's columns of per-position `t` [N, <= padded] (zeros past its end), on `device`."""
        if t is None:
            return None
        return torch.nn.functional.pad(t, (0, self.padded - t.shape[1]))[:, self.index].to(device)

    def put(self, local: torch.Tensor, width: int) -> torch.Tensor:
        """[N, width] holding `local` in this rank's columns and zeros in the others' (summed over ranks later)."""
        full = local.new_zeros(local.shape[0], self.padded)
        full[:, self.index.to(local.device)] = local
        return full[:, :width]


def launcher_rank() -> int:
    """This process's global rank as set by torchrun or srun (0 when launched alone)."""
    return _launcher_env()[0]


def _launcher_env() -> tuple[int, int, int]:
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world]), int(os.environ.get(local, 0))
    return 0, 1, 0


def world_size() -> int:
    """Processes of the job: torch.distributed's count once it is up, the launcher's before."""
    return dist.get_world_size() if dist.is_initialized() else _launcher_env()[1]


def initialize(cfg: MegatronConfig) -> Layout:
    from megatron.core import parallel_state as ps

    model_parallel = cfg.tensor_parallel * cfg.pipeline_parallel * cfg.context_parallel
    # experts are split over ranks carved out of the data- and context-parallel ones
    fewest = cfg.tensor_parallel * cfg.pipeline_parallel * math.lcm(cfg.context_parallel, cfg.expert_parallel)
    rank, world, local = _launcher_env()
    if world_size() == 1 and fewest > 1:
        raise ParallelError(
            f"actor.megatron: tensor_parallel {cfg.tensor_parallel} x pipeline_parallel {cfg.pipeline_parallel} x "
            f"context_parallel {cfg.context_parallel}"
            + (f" (with expert_parallel {cfg.expert_parallel})" if cfg.expert_parallel > 1 else "")
            + f" = {fewest} processes are needed, and this is one process: launch with `torchrun --nproc-per-node "
            f"{fewest} -m soup_megatron.cli train ...` (or srun with that many tasks)")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            store = dist.FileStore(tempfile.mkstemp(prefix="soup-megatron-store-")[1], 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world)
    world = dist.get_world_size()
    if world % model_parallel:
        raise ParallelError(f"world size {world} is not a multiple of tensor_parallel x pipeline_parallel x "
                            f"context_parallel = {cfg.tensor_parallel} x {cfg.pipeline_parallel} x "
                            f"{cfg.context_parallel} = {model_parallel}")
    if (world // cfg.pipeline_parallel) % (cfg.tensor_parallel * cfg.expert_parallel):
        raise ParallelError(f"actor.megatron.expert_parallel={cfg.expert_parallel}: the "
                            f"{world // cfg.pipeline_parallel} ranks of a pipeline stage do not split into "
                            f"tensor_parallel {cfg.tensor_parallel} x expert_parallel {cfg.expert_parallel} (world "
                            f"{world} / pipeline_parallel {cfg.pipeline_parallel}); choose expert_parallel dividing "
                            "data x context parallel")
    wanted = (cfg.tensor_parallel, cfg.pipeline_parallel, cfg.virtual_pipeline if cfg.virtual_pipeline > 1 else None,
              cfg.context_parallel, cfg.expert_parallel)
    if ps.model_parallel_is_initialized():
        current = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                   ps.get_virtual_pipeline_model_parallel_world_size(), ps.get_context_parallel_world_size(),
                   ps.get_expert_model_parallel_world_size())
        if current != wanted:
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel,
            pipeline_model_parallel_size=cfg.pipeline_parallel,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline if cfg.virtual_pipeline > 1 else None,
            context_parallel_size=cfg.context_parallel,
            expert_model_parallel_size=cfg.expert_parallel,
        )
    if torch.cuda.is_available():  # megatron's layers (TE, sequence parallel) fork these streams; dropout is 0
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    return Layout(rank=dist.get_rank(), world=world, tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel,
                  vp=cfg.virtual_pipeline, cp=cfg.context_parallel, dp=ps.get_data_parallel_world_size(),
                  tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                  dp_rank=ps.get_data_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
                  ep=cfg.expert_parallel, ep_rank=ps.get_expert_model_parallel_rank())


def rank_places(layout: Layout) -> list[dict]:
    """Where each global rank runs, in rank order: its host and its place in the layout (a collective: every
    rank calls it). A multi-node run records it, so that it shows which node holds which pipeline stage."""
    mine = {"host": socket.gethostname(), **{k: v for k, v in asdict(layout).items() if k.endswith("rank")}}
    places: list = [None] * layout.world
    dist.all_gather_object(places, mine)
    return places


def check_batch_split(samples: int, layout: Layout) -> None:
    """Every data-parallel rank must get the same number of samples per optimizer update (its
    microbatches may be uneven: the loss carries global token weights)."""
    if samples % layout.dp:
        raise ParallelError(
            f"{samples} samples per optimizer update (rollout.prompts_per_step x rollout.group_size / "
            f"algo.minibatches) do not split over {layout.dp} data-parallel ranks ({samples} / {layout.dp} = "
            f"{samples / layout.dp:.2f}); data parallel = world {layout.world} / (tp {layout.tp} x pp {layout.pp} "
            f"x cp {layout.cp})")
    if layout.vp > 1:
        interleaved_microbatches(1, samples // layout.dp, layout)


def rows_per_update(rows: int, layout: Layout) -> int:
    """The fewest rows >= `rows` that `check_batch_split` accepts."""
    per_rank = max(-(-rows // layout.dp), 2 * layout.pp if layout.vp > 1 else 1)
    return per_rank * layout.dp


def interleaved_microbatches(count: int, samples: int, layout: Layout) -> int:
    """How many microbatches the interleaved schedule runs for `samples` rows of one data-parallel rank,
    `count` being what micro_batch_size gives: a multiple of pipeline_parallel (it runs them in groups of
    that many), and at least two groups. With one group the first stage runs every microbatch in its
    warm-up, and there megatron-core 0.16's schedule deadlocks when stages exchange shapes first
    (variable_seq_lengths): the last stage waits for a gradient's shape the first one sends only later."""
    pp = layout.pp
    wanted = max(-(-count // pp) * pp, 2 * pp)
    if wanted > samples:
        raise ParallelError(
            f"virtual_pipeline={layout.vp}: the interleaved schedule runs at least 2 x pipeline_parallel = {2 * pp} "
            f"microbatches of one sample or more, and a data-parallel rank has {samples} samples here (raise "
            "rollout.prompts_per_step x rollout.group_size / algo.minibatches, or use virtual_pipeline=1)")
    return wanted
