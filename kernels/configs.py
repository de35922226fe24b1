"""Launch configurations: the only place block sizes, warps and pipeline stages are chosen.

The dispatcher (`fused_concept._triton_path`) asks `choose(kernel, dtype)`; `benchmarks/kernel_report.py` and the compile
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
# three stages of 64-wide K slabs (96 KB of shared memory, inside sm_80's 163 KB). The backward sweeps
# hold GROUP gradient tiles per group in a per-program scratch slab (256 KB in bf16) and multiply them
# out in 64-wide column blocks of D. Each owner mode has its own tiles: the largest that compile without
# spills with both tested Triton versions (3.6.0, whose ptxas is 12.8, and 3.8.0; see
# `python -m benchmarks.kernel_report`). float32 inputs use exact ("ieee") FMA products on smaller tiles
# (larger float32 tiles spill).
_GPU = {
    "dense_stats": {
        "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
        "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 8, 3),
    },
    # the same kernel with SUM_LOGITS (label smoothing): the extra row accumulator spills 48-64 bytes on
    # 128 x 128 tiles (fp16, bias + softcap); 64-row tiles on eight warps compile clean at ~180 registers
    # on sm_80 and sm_90 with both tested Triton versions (four warps spill on sm_80)
    "dense_stats_smoothing": {
        "16bit": LaunchConfig("16bit", {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
        "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 8, 3),
    },
    # the backward kernel, per owner mode (dense_grad.py): _h OWNER_ROWS, _w OWNER_COLUMNS, _atomic
    # OWNER_ATOMIC, _chunk OWNER_CHUNK
    # 128 x 64 logit tiles, 16 per group (the same 1024-deep reduction and slab as 8 x 128): 128 x 128
    # tiles spill on sm_90 with bias + softcap + filter under Triton 3.6 (ptxas 12.8)
    "dense_grad_h": {
        "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 64,
                                        "GROUP": 16}, 8, 2),
        "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "BLOCK_D": 32, "GROUP": 8}, 8, 2),
    },
    "dense_grad_w": {
        "16bit": LaunchConfig("16bit", {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_D": 64,
                                        "GROUP": 8}, 8, 2),
        "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "BLOCK_D": 32, "GROUP": 8}, 8, 2),
    },
    "dense_grad_atomic": {
        "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_D": 64,
                                        "GROUP": 1}, 8, 2),
        "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "BLOCK_D": 32, "GROUP": 1}, 8, 2),
    },
    "dense_grad_chunk": {
        "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 64,
                                        "GROUP": 1}, 8, 3),
        "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "BLOCK_D": 32, "GROUP": 1}, 8, 2),
    },
    "chunk_matmul": {
        "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
        "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, 8, 2),
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
    # strategy "rows": one program per BLOCK_R rows of a chunk's logits, BLOCK_V-wide blocks along the row
    # (memory-bound: two reads and one write of the chunk); BLOCK_J (>= ids per row) is per call. Not
    # measured on a GPU yet: one row per program, 16 elements per thread at 8 warps, as a start.
    "chunk_rows": {
        "16bit": LaunchConfig("16bit", {"BLOCK_R": 1, "BLOCK_V": 4096}, 8, 1),
        "fp32": LaunchConfig("fp32", {"BLOCK_R": 1, "BLOCK_V": 2048}, 8, 1),
    },
    # one program per tile row / column of a chunk's keep map; MAX (>= tiles per row and column) is per call
    "tile_lists": {
        "16bit": LaunchConfig("16bit", {}, 4, 1),
        "fp32": LaunchConfig("fp32", {}, 4, 1),
    },
}

# Per-architecture replacements (compute capability major * 10). sm_80's mma.sync keeps the 128 x 128
# accumulator in registers alongside the operand fragments: 32-wide K slabs, four stages, avoid spills.
_ARCH_OVERRIDES = {
    80: {
        "dense_stats": {
            "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 4),
        },
        "dense_grad_h": {
            "16bit": LaunchConfig("16bit", {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_D": 64,
                                            "GROUP": 8}, 8, 2),
        },
        "dense_grad_w": {
            "16bit": LaunchConfig("16bit", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 64,
                                            "GROUP": 8}, 8, 2),
            # one stage: two stages spill 16 bytes under Triton 3.6 (ptxas 12.8); FMA-bound anyway
            "fp32": LaunchConfig("fp32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "BLOCK_D": 32, "GROUP": 8}, 8, 1),
        },
        "dense_grad_atomic": {
            "16bit": LaunchConfig("16bit", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 64,
                                            "GROUP": 1}, 8, 2),
        },
        "dense_grad_chunk": {
            "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_D": 64,
                                            "GROUP": 1}, 8, 4),
        },
        "chunk_matmul": {
            "16bit": LaunchConfig("16bit", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8, 4),
        },
    },
}

ARCHS = (80, 90)

_INTERPRETER = {
    "dense_stats": LaunchConfig("interpret", {"BLOCK_M": 128, "BLOCK_N": 512, "BLOCK_K": 128}, 4, 1),
    "dense_stats_smoothing": LaunchConfig("interpret", {"BLOCK_M": 128, "BLOCK_N": 512, "BLOCK_K": 128}, 4, 1),
    # small enough that the grouped backward runs several groups, a partial one, and a ragged D
    "dense_grad_h": LaunchConfig("interpret", {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "BLOCK_D": 64,
                                               "GROUP": 3}, 4, 1),
    "dense_grad_w": LaunchConfig("interpret", {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "BLOCK_D": 64,
                                               "GROUP": 3}, 4, 1),
    "dense_grad_atomic": LaunchConfig("interpret", {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64,
                                                    "BLOCK_D": 64, "GROUP": 1}, 4, 1),
    "dense_grad_chunk": LaunchConfig("interpret", {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "BLOCK_D": 64,
                                                   "GROUP": 1}, 4, 1),
    # BLOCK_K divides both tile sides of dense_grad_chunk (the skip lists' LIST_K), BLOCK_M both too
    "chunk_matmul": LaunchConfig("interpret", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}, 4, 1),
    "sparse_logits": LaunchConfig("interpret", {"BLOCK_R": 128, "BLOCK_K": 128}, 4, 1),
    "sparse_grad_hidden": LaunchConfig("interpret", {"BLOCK_R": 128, "BLOCK_K": 128}, 4, 1),
    "sparse_grad_weight": LaunchConfig("interpret", {"BLOCK_U": 256, "BLOCK_K": 128}, 4, 1),
    "tile_lists": LaunchConfig("interpret", {}, 4, 1),
    # several rows per program (the interpreter's cost is per program) and several blocks per row
    "chunk_rows": LaunchConfig("interpret", {"BLOCK_R": 16, "BLOCK_V": 256}, 4, 1),
}

KERNELS = tuple(_GPU)


def dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "16bit"
    if dtype == torch.float32:
        return "fp32"
    raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 hidden/weight, got {dtype}")


def arch_group(capability) -> int:
    """(major, minor) or an int like 90 -> the configuration family: 80 for sm_8x, 90 for sm_90 and newer."""
    major = capability[0] if isinstance(capability, (tuple, list)) else int(capability) // 10
    return 80 if major < 9 else 90


def choose(kernel: str, dtype: torch.dtype, device: torch.device | None = None) -> LaunchConfig:
    cls = dtype_class(dtype)
    if interpreting() or device is None or device.type != "cuda":
        return _INTERPRETER[kernel]
    return config_for(kernel, cls, arch_group(torch.cuda.get_device_capability(device)))


def config_for(kernel: str, cls: str, arch: int) -> LaunchConfig:
    override = _ARCH_OVERRIDES.get(arch_group(arch), {}).get(kernel, {}).get(cls)
    return override if override is not None else _GPU[kernel][cls]


def all_configs(arch: int):
    """Every (kernel, dtype class) -> LaunchConfig the dispatcher can choose on a GPU of this arch."""
    return {(k, c): config_for(k, c, arch) for k, by_cls in _GPU.items() for c in by_cls}


# tl.dot's input_precision. It acts on float32 operands only (16-bit operands are multiplied exactly on
# the tensor cores with float32 accumulation, whatever it says): "ieee" keeps float32 inputs at the
# contract's ~1e-5 (tf32 would give ~3e-4).
DOT_PRECISION = "ieee"
