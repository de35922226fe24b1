"""Matrix product with a float32 accumulator, for one vocabulary chunk of the backward.

Formula, for A [M, K] and B [K, N] in the input dtype (any strides, so transposed views are free):

    C[m, n] = (C[m, n] if ACCUMULATE else 0) + sum_{k kept} A[m, k] * B[k, n]

accumulated in float32 and cast to C's dtype once, at the store. C is float32 when it accumulates across
launches (ACCUMULATE); otherwise it may be in the input dtype (the result is complete in one launch).

Used with the chunk's logit gradient dR_c [N_rows, V_c] (written by `_dense_grad_kernel`, OWNER_CHUNK):
dH += dR_c @ W_c (ACCUMULATE, float32 dH) and dW_c = dR_c^T @ H (written in the weight's dtype).
SKIP (list_ptr given): only the k of kept tiles are summed. A's rows come in bands of LIST_ROWS (one
tile row of dR_c, or of dR_c^T) and its columns in tiles of LIST_K; band r keeps the LIST_K-wide column
tiles list[r, 0 .. count[r]) (tile_lists.py, ascending), the others are zero in A and are not read.
Needs LIST_ROWS % BLOCK_M == 0 and LIST_K % BLOCK_K == 0 (checked by the launcher).
Grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) programs in GROUP_M-row bands (consecutive programs share B
tiles in L2); each program owns one C tile, so there are no races and no atomics.
"""
import triton
import triton.language as tl


@triton.jit
def _dot_step(a_ptr, b_ptr, acc, rm64, rn64, m_ok, n_ok, k0, K, stride_am, stride_ak, stride_bk, stride_bn,
              BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + A[rows, k0:k0+BLOCK_K] @ B[k0:k0+BLOCK_K, cols] (zeros past K)."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = k < K
    k64 = k.to(tl.int64)
    a = tl.load(a_ptr + rm64[:, None] * stride_am + k64[None, :] * stride_ak,
                mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(b_ptr + k64[:, None] * stride_bk + rn64[None, :] * stride_bn,
                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.heuristics({"SKIP": lambda args: args["list_ptr"] is not None})
@triton.jit
def _chunk_matmul_kernel(
    a_ptr, b_ptr, c_ptr, list_ptr, count_ptr, M, N, K, list_stride,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LIST_ROWS: tl.constexpr, LIST_K: tl.constexpr, SKIP: tl.constexpr,
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)
    first_m = band * GROUP_M
    band_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % band_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // band_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if SKIP:
        steps: tl.constexpr = LIST_K // BLOCK_K
        band_list = list_ptr + ((pid_m * BLOCK_M) // LIST_ROWS).to(tl.int64) * list_stride
        kept = tl.load(count_ptr + (pid_m * BLOCK_M) // LIST_ROWS)
        for i in range(0, kept * steps):
            tile = tl.load(band_list + i // steps)
            acc = _dot_step(a_ptr, b_ptr, acc, rm64, rn64, m_ok, n_ok, tile * LIST_K + (i % steps) * BLOCK_K, K,
                            stride_am, stride_ak, stride_bk, stride_bn, BLOCK_K, UPCAST, DOT_PRECISION)
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _dot_step(a_ptr, b_ptr, acc, rm64, rn64, m_ok, n_ok, k0, K,
                            stride_am, stride_ak, stride_bk, stride_bn, BLOCK_K, UPCAST, DOT_PRECISION)
    c = c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    c_ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=c_ok)
