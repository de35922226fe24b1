"""The implementations behind the backend seam (``fused_concept.core.dispatch``): each computes steps 1 and 3
of docs/internals.md over one vocabulary shard without storing [N, V] logits.

  torch_chunked   plain PyTorch, chunks of rows (any device; the CPU path)
  triton_path     Triton kernels (``fused_concept.kernels``; CUDA, or the Triton interpreter): the strategies
                  "recompute" / "recompute_sweep" here, "rows" in triton_rows
  products        the matrix products both use (tensor cores with float32 outputs on CUDA)

Importing this package registers both with the seam; a backend module is imported when first used.
"""
from fused_concept.core import dispatch


def _torch_backend() -> dispatch.Backend:
    from fused_concept.backends import torch_chunked as p

    return dispatch.Backend("torch", p.torch_partial_stats, p.torch_shard_grads, p.torch_stats_and_grads)


def _triton_backend() -> dispatch.Backend:
    from fused_concept.backends import triton_path as p

    return dispatch.Backend("triton", p.triton_partial_stats, p.triton_shard_grads, p.triton_stats_and_grads,
                            p.KERNEL_OPTIONS, _fuses_with=p.fuses_with, check_options=p.check_kernel_options)


dispatch.register("torch", _torch_backend)
dispatch.register("triton", _triton_backend)
