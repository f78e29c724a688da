"""Running megatron-core on CPU (gloo): the one place that deals with its CUDA assumptions.

`enable()` does nothing when CUDA is available. Without CUDA it
- makes `RotaryEmbedding.get_emb`, which moves its frequencies to `torch.cuda.current_device()`,
  see the CPU as the current device for the duration of that call only;
- does the same around `dist_checkpointing.save` / `load` (their consistency checks all-reduce a
  flag tensor made on the current device), and has the torch_dist writer copy tensors to host
  memory blocking, as there is no device to synchronise with (its non-blocking path ends in
  `torch.cuda.synchronize()`).
The other CUDA-only parts are avoided rather than patched:
core attention is our SDPA module (no global CUDA memory buffer), and the CPU actor runs its
microbatches directly instead of through megatron's pipeline schedules (which allocate on "cuda"),
so pipeline parallelism is refused on CPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_enabled = False


def cpu_only() -> bool:
    return not torch.cuda.is_available()


@contextlib.contextmanager
def _current_device_is_cpu():
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = original


def _on_cpu(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _current_device_is_cpu():
            return method(*args, **kwargs)

    return wrapper


def enable() -> None:
    global _enabled
    if _enabled or not cpu_only():
        return
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    RotaryEmbedding.get_emb = _on_cpu(RotaryEmbedding.get_emb)
    dist_checkpointing.save = _on_cpu(dist_checkpointing.save)
    dist_checkpointing.load = _on_cpu(dist_checkpointing.load)
    preload = FileSystemWriterAsync.preload_tensors
    FileSystemWriterAsync.preload_tensors = staticmethod(
        lambda write_buckets, non_blocking=True: preload(write_buckets, False))
    _enabled = True
