"""Let PyPI's CUDA torchvision 0.28.0 import beside the CPU torch (see README.md here)."""

import os

if os.environ.get("SOUP_SGLANG_SHIMS") == "1":
    import torch

    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
