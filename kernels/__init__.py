"""Triton kernels of the fused concept loss (installed as `fused_concept.kernels`; internal).

One kernel per module, each starting with the formula it computes and its grid:

  dense_stats         forward: online max / arg-max / log-sum-exp over vocabulary slices (tl.dot tiles)
  sparse_logits       forward: indexed dot at the target / concept ids -> target logit, set lse, soft dot
  dense_grad          backward: recomputed logit tiles -> coef * softmax (a chunk buffer, or dH / dW / db)
  chunk_matmul        backward: dH += dR_c W_c and dW_c = dR_c^T H for one vocabulary chunk (fp32 accumulate),
                      optionally over the kept tiles only
  tile_lists          backward: a chunk's tile keep map -> ascending lists of kept tiles for chunk_matmul
  sparse_grad_hidden  backward: signed sparse coefficients at the K+1 ids per row into dH
  sparse_grad_weight  backward: the same coefficients, grouped by id, into dW / db (no atomics)
  chunk_rows          strategy "rows": over one chunk of rows' logits (from cuBLAS), the row statistics and the
                      logit gradient written in place (fused_concept/backends/triton_rows.py)

`configs` chooses launch configurations; `python -m benchmarks.kernel_report --arch 80 --arch 90` compiles
every one of them for those GPU architectures and prints registers, spills, shared memory and HGMMA use.
The launching code is `fused_concept._triton_path`.
"""
