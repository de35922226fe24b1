"""The matrix products of the backends: on CUDA, 16-bit operands on the tensor cores with a float32 output
(cuBLAS through aten::mm.dtype_out), so a chunk's logits and its gradient products are rounded once."""
from __future__ import annotations

import torch
from torch import Tensor

# cuBLAS writes a 16-bit product straight into a float32 output (aten::mm.dtype_out: CUDA, torch >= 2.8)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")


def wide_products(t: Tensor) -> bool:
    """Whether products of 16-bit `t` can run on the tensor cores with a float32 output (CUDA)."""
    return _MM_OUT_DTYPE and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def mm_into(a: Tensor, b: Tensor, c: Tensor, *, accumulate: bool) -> None:
    """c = [c +] a @ b for 16-bit a, b where `wide_products(a)`: float32 accumulation, one rounding to c's
    dtype (float32 or a's)."""
    if accumulate:
        torch.addmm(c, a, b, out_dtype=c.dtype, out=c)
    elif c.dtype == a.dtype:
        torch.mm(a, b, out=c)
    else:
        torch.mm(a, b, out_dtype=c.dtype, out=c)
