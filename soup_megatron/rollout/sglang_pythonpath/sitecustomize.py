"""CPU stand-ins for SGLang's servers (see README.md here): let PyPI's CUDA torchvision 0.28.0 import beside the
CPU torch, and give SGLang's host-memory allocator a plain allocation for device "cpu"."""

import importlib.abc
import os
import sys

if os.environ.get("SOUP_SGLANG_SHIMS") == "1":
    import torch

    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")

    _HOST_POOLS = "sglang.srt.mem_cache.pool_host.common"

    def _alloc_on_host(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
        """Host buffers (the routed-experts capture's, for one) without CUDA: nothing to pin or register."""
        return torch.empty(dims, dtype=dtype, device="cpu")

    class _PatchHostPools(importlib.abc.MetaPathFinder):
        """Once SGLang's host-pool module is imported (in whichever server process), its allocator table
        maps device "cpu" to `_alloc_on_host`; its default, `alloc_with_host_register`, calls CUDA."""

        def find_spec(self, fullname, path, target=None):
            if fullname != _HOST_POOLS:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.ALLOC_MEMORY_FUNCS["cpu"] = _alloc_on_host

            spec.loader.exec_module = exec_module
            return spec

    import importlib.util  # noqa: E402

    sys.meta_path.insert(0, _PatchHostPools())
