"""Running megatron-core on CPU (gloo): the one place that deals with its CUDA assumptions.

Without CUDA, `cuda_on_cpu()` is a context in which
- `torch.cuda.current_device()` is the CPU, so tensors megatron makes "on the current device" (rotary
  frequencies, pipeline receive buffers, checkpoint consistency flags) are CPU tensors;
- tensor factories asked for `device="cuda"` make CPU tensors, pinned memory is not asked for (there is
  no device to pin for), and `Tensor.cuda()` returns the tensor (the schedules' token counter, the
  tied-embedding copy of a last pipeline stage, the rotary positions of a context-parallel rank);
- `torch.cuda.synchronize()` returns at once: there is no device (pipeline stages call it after
  exchanging tensor shapes; gloo's sends and receives have completed when their `wait()` returns);
- `Tensor.type()` names the CUDA type of the tensor's dtype ("torch.cuda.FloatTensor"): megatron's
  optimizers sort parameters into fp32 / half groups by these names and refuse any other.
It is entered around model construction, megatron's DDP and optimizer (construction, gradient
reduction, step, state dicts), the forward/backward schedules, RotaryEmbedding and
`dist_checkpointing.save` / `load`; `enable()` installs the last two wrappers and has the torch_dist
writer copy tensors to host memory blocking, as there is no device to synchronise with (its
non-blocking path ends in `torch.cuda.synchronize()`), and posts pipeline stages' shape messages in an
order gloo pairs correctly (`_exchange_shapes`), and makes megatron's RNG tracker the one whose fork is a
plain context: layers fork a per-rank CUDA RNG stream around dropout in sequence-parallel regions, there
is no CUDA RNG, and every dropout of this actor is 0. For mixture-of-experts layers it gives the alltoall
token dispatcher no side stream (it makes a `torch.cuda.Stream` to copy its split sizes to the host) and hands
gloo's `all_to_all_single` those split sizes as numpy arrays, as on a GPU (it refuses tensors); under tensor
parallelism the dispatcher also gathers and reduce-scatters pieces of unequal length over the tensor-parallel
ranks, which gloo cannot, so those two go through equal-length collectives (`_gather_uneven`,
`_reduce_scatter_uneven`). With CUDA present all of this does nothing.
One thing is not about the CPU: where Transformer Engine is absent (any CPU, a GPU without it), `enable()`
binds the TE kernels megatron's MoE code tests for (`te_general_gemm`, `fused_*`) to None; megatron leaves
them unbound and then reads them (found on an H200 without TE: `NameError: te_general_gemm`).
Core attention is our SDPA module rather than a patch (megatron's local one uses a CUDA buffer).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def cpu_only() -> bool:
    return not torch.cuda.is_available()


class _CudaFactoriesOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_on_cpu():
    if not cpu_only():
        yield
        return
    current_device, synchronize = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device, torch.cuda.synchronize = (lambda: "cpu"), (lambda device=None: None)
    try:
        with _CudaFactoriesOnCpu():
            yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = current_device, synchronize


def _on_cpu(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with cuda_on_cpu():
            return method(*args, **kwargs)

    return wrapper


def _exchange_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """megatron's P2PCommunicator._communicate_shapes, with the messages posted forward stream first:
    [send next, receive prev, send prev, receive next]. megatron posts [send prev, receive prev, send next,
    receive next]. With two pipeline stages the previous and the next rank are the same process, and gloo
    pairs the messages between two processes in the order they are posted, so when a step sends both ways
    at once (the interleaved schedule's steady state) a backward shape landed in the peer's forward
    receive. Returns (shape received from prev, shape received from next), [0, 0, 0] where none."""
    import torch.distributed as dist

    def shape_of(t):
        return None if t is None else torch.tensor(t.size(), dtype=torch.int64)

    from_prev = torch.empty(3, dtype=torch.int64) if recv_prev else None
    from_next = torch.empty(3, dtype=torch.int64) if recv_next else None
    posted = [(dist.isend, shape_of(tensor_send_next), self.next_rank), (dist.irecv, from_prev, self.prev_rank),
              (dist.isend, shape_of(tensor_send_prev), self.prev_rank), (dist.irecv, from_next, self.next_rank)]
    for request in [op(t, peer, group=self.pp_group) for op, t, peer in posted if t is not None]:
        request.wait()
    return tuple([0, 0, 0] if t is None else t.tolist() for t in (from_prev, from_next))


_TE_KERNELS = ("te_general_gemm", "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
               "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
               "fused_topk_with_score_function", "fused_unpermute")


def _split_sizes_as_lists(self, point: str, tokens_per_expert=None):
    """megatron's MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize without CUDA: at the point where it
    would copy the all-to-all split sizes to the host on a side stream, make them numpy arrays as it does
    (they are already on the host; gloo takes sequences, not tensors); there is nothing to synchronise."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def _gather_uneven(gather):
    """megatron's _gather_along_first_dim, whose pieces of unequal length (`output_split_sizes`) gloo's
    all_gather refuses: each rank's piece padded to the longest, gathered, and the padding cut off."""
    @functools.wraps(gather)
    def wrapper(input_, group, output_split_sizes=None, use_global_buffer=False):
        import torch.distributed as dist

        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros(max(sizes), *input_.shape[1:])
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])

    return wrapper


def _reduce_scatter_uneven(reduce_scatter):
    """megatron's _reduce_scatter_along_first_dim with pieces of unequal length (`input_split_sizes`), which
    gloo's reduce_scatter refuses: the whole tensor summed over the ranks, then this rank's piece taken."""
    @functools.wraps(reduce_scatter)
    def wrapper(input_, group, input_split_sizes=None, use_global_buffer=False):
        import torch.distributed as dist

        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        summed = input_.contiguous().clone()
        dist.all_reduce(summed, group=group)
        return torch.split(summed, [int(n) for n in input_split_sizes], dim=0)[group.rank()].clone()

    return wrapper


def _enable_moe() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    mappings._gather_along_first_dim = _gather_uneven(mappings._gather_along_first_dim)
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_uneven(mappings._reduce_scatter_along_first_dim)

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "no stream: CPU"  # set, so that no torch.cuda.Stream is made
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _split_sizes_as_lists


def _bind_absent_te_kernels() -> None:
    from megatron.core.transformer.moe import moe_utils

    for name in _TE_KERNELS:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def enable() -> None:
    global _enabled
    if _enabled:
        return
    _bind_absent_te_kernels()
    if not cpu_only():
        _enabled = True
        return
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    RotaryEmbedding.get_emb = _on_cpu(RotaryEmbedding.get_emb)
    P2PCommunicator._communicate_shapes = _exchange_shapes
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _enable_moe()
    dist_checkpointing.save = _on_cpu(dist_checkpointing.save)
    dist_checkpointing.load = _on_cpu(dist_checkpointing.load)
    preload = FileSystemWriterAsync.preload_tensors
    FileSystemWriterAsync.preload_tensors = staticmethod(
        lambda write_buckets, non_blocking=True: preload(write_buckets, False))
    _enabled = True
