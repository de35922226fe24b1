"""Launch configurations: the only place block sizes, warps and pipeline stages are chosen.

The dispatcher (`fused_concept._triton_path`) asks `choose(kernel, dtype)`; `report.py` and the compile
test enumerate `all_configs()`, so every configuration the dispatcher can pick is the one that is checked.
Under the Triton interpreter (TRITON_INTERPRET=1, CPU) one fixed set of large blocks is used: the
interpreter's cost is per program instance, not per element.
"""
from __future__ import annotations

import os
from typing import Dict, NamedTuple

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class LaunchConfig(NamedTuple):
    name: str
    blocks: Dict[str, int]
    num_warps: int
    num_stages: int


# Matrix kernels. 16-bit inputs: 128 x 128 logit tiles on tensor cores (wgmma on sm_90, mma on sm_80),
# three stages of 64-wide K slabs (96 KB of shared memory, inside sm_80's 163 KB). float32 inputs use
# exact ("ieee") products on smaller tiles.
_GPU = {
    "dense_stats": {
        "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
        "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
    },
    "dense_grad": {
        "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 2),
        "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 2),
    },
    "sparse_logits": {
        "16bit": LaunchConfig("16bit", {"BLOCK_R": 16, "BLOCK_K": 128}, 4, 1),
        "fp32": LaunchConfig("fp32", {"BLOCK_R": 16, "BLOCK_K": 128}, 4, 1),
    },
    "sparse_grad_hidden": {
        "16bit": LaunchConfig("16bit", {"BLOCK_R": 16, "BLOCK_K": 128}, 4, 1),
        "fp32": LaunchConfig("fp32", {"BLOCK_R": 16, "BLOCK_K": 128}, 4, 1),
    },
    "sparse_grad_weight": {
        "16bit": LaunchConfig("16bit", {"BLOCK_U": 16, "BLOCK_K": 128}, 4, 1),
        "fp32": LaunchConfig("fp32", {"BLOCK_U": 16, "BLOCK_K": 128}, 4, 1),
    },
}

_INTERPRETER = {
    "dense_stats": LaunchConfig("interpret", {"BLOCK_M": 128, "BLOCK_N": 512, "BLOCK_K": 128}, 4, 1),
    "dense_grad": LaunchConfig("interpret", {"BLOCK_M": 128, "BLOCK_N": 512, "BLOCK_K": 128}, 4, 1),
    "sparse_logits": LaunchConfig("interpret", {"BLOCK_R": 128, "BLOCK_K": 128}, 4, 1),
    "sparse_grad_hidden": LaunchConfig("interpret", {"BLOCK_R": 128, "BLOCK_K": 128}, 4, 1),
    "sparse_grad_weight": LaunchConfig("interpret", {"BLOCK_U": 256, "BLOCK_K": 128}, 4, 1),
}

KERNELS = tuple(_GPU)


def dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "16bit"
    if dtype == torch.float32:
        return "fp32"
    raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 hidden/weight, got {dtype}")


def choose(kernel: str, dtype: torch.dtype) -> LaunchConfig:
    cls = dtype_class(dtype)
    if interpreting():
        return _INTERPRETER[kernel]
    return _GPU[kernel][cls]


def all_configs():
    """Every (kernel, dtype class) -> LaunchConfig the dispatcher can choose on a GPU."""
    return {(k, c): cfg for k, by_cls in _GPU.items() for c, cfg in by_cls.items()}


def dot_precision(dtype: torch.dtype) -> str:
    """float32 products are exact ("ieee") so float32 results match the contract to ~1e-5."""
    return "ieee"
