"""One tile of logits, shared by the forward statistics and the backward kernels:

    z[m, n] = sum_k h[rows_m, k] * W[cols_n, k]  (+ b[cols_n])      then, with a softcap c,
    z       = c * tanh(z / c),  tanh(x) written as 1 - 2 / (exp(2x) + 1) (exact limits +-1)

Accumulated in float32 over BLOCK_K slices of D; rows / cols outside their masks read zeros.
A @triton.jit device function (inlined into its callers), not a kernel: it has no grid.
"""
import triton
import triton.language as tl


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, softcap,
               stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        k_ok = k < D
        k_off = k.to(tl.int64)
        h = tl.load(h_ptr + rows64[:, None] * stride_hn + k_off[None, :] * stride_hd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * stride_wv + k_off[None, :] * stride_wd,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong: upcast there
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols64 * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
    return acc
