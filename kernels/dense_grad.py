"""Dense pass of the backward: recompute the logits tile by tile and accumulate the dense gradient term.

Formula, with the GLOBAL per-row statistics lse_i and one scalar coefficient c_i per row (coef_dense):

    z_iv   = softcap * tanh(r_iv / softcap),   r_iv = h_i . W_v + b_v   (z = r without softcap)
    dr_iv  = c_i * exp(z_iv - lse_i) * (1 - (z_iv / softcap)^2)         (last factor only with softcap)
    dH_i  += sum_v dr_iv W_v        dW_v += sum_i dr_iv h_i        db_v += sum_i dr_iv

(the sparse part of the gradient, at the K+1 ids of each row, is added by the sparse kernels).
Accumulators are float32 buffers. Who owns which output decides the grid (OWNER, a constexpr):

    OWNER = 0  grid (cdiv(N, BLOCK_M), cdiv(V, BLOCK_N)): one logit tile per program, results added
               with atomics (one recompute for dH and dW together; the order of additions is not fixed)
    OWNER = 1  grid (cdiv(N, BLOCK_M), SLICES): a program owns BLOCK_M rows of the dH partial of its
               vocabulary slice [s * chunk, (s + 1) * chunk) (buffer [SLICES, N, D]) and sweeps the slice in
               order, adding with plain loads and stores (deterministic; the caller sums the slices in order)
    OWNER = 2  grid (cdiv(V, BLOCK_N),): a program owns BLOCK_N rows of dW and db and sweeps the rows in
               order (deterministic)

FILTER skips a tile whose every softmax probability exp(z_iv - lse_i) is below filter_eps (its dense
contribution is dropped; the sparse terms are added separately and never filtered).
"""
import triton
import triton.language as tl


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
    "FILTER": lambda args: args["filter_eps"] > 0,
})
@triton.jit
def _dense_grad_kernel(
    h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, dh_ptr, dw_ptr, db_ptr,
    N, V, D, chunk, softcap, filter_eps,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    OWNER: tl.constexpr, DO_DH: tl.constexpr, DO_DW: tl.constexpr, DO_DB: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    if OWNER == 0:
        n_iter = 1
    elif OWNER == 1:
        n_iter = tl.cdiv(tl.minimum(chunk, V - pid1 * chunk), BLOCK_N)
    else:
        n_iter = tl.cdiv(N, BLOCK_M)
    dh_base = dh_ptr
    if OWNER == 1:
        dh_base += pid1.to(tl.int64) * N * D  # this slice's partial
    ks = tl.arange(0, BLOCK_K)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)

    for it in range(0, n_iter):
        if OWNER == 0:
            tile_m = pid0
            tile_n = pid1
        elif OWNER == 1:
            tile_m = pid0
            tile_n = pid1 * (chunk // BLOCK_N) + it
        else:
            tile_m = it
            tile_n = pid0
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        col_ok = cols < V
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        h_row_off = rows64 * stride_hn
        w_col_off = cols64 * stride_wv

        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            k_ok = k < D
            k_off = k.to(tl.int64)
            h = tl.load(h_ptr + h_row_off[:, None] + k_off[None, :] * stride_hd,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + w_col_off[:, None] + k_off[None, :] * stride_wd,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols64 * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            t = 1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0)
            acc = softcap * t
        lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + rows64, mask=row_ok, other=0.0)
        prob = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(acc - lse[:, None]), 0.0)
        dz = coef[:, None] * prob
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)

        keep = True
        if FILTER:
            keep = tl.max(tl.max(prob, axis=1), axis=0) >= filter_eps
        if keep:
            if DO_DB:
                if OWNER == 0:
                    tl.atomic_add(db_ptr + cols64, tl.sum(dz, axis=0), mask=col_ok)
                else:
                    db_acc += tl.sum(dz, axis=0)
            if UPCAST:
                dz_op = dz
            else:
                dz_op = dz.to(w_ptr.dtype.element_ty)
            if DO_DH or DO_DW:
                for k0 in range(0, D, BLOCK_K):
                    k = k0 + ks
                    k_ok = k < D
                    k_off = k.to(tl.int64)
                    if DO_DH:
                        w = tl.load(w_ptr + w_col_off[:, None] + k_off[None, :] * stride_wd,
                                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                        if UPCAST:
                            w = w.to(tl.float32)
                        part = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
                        dh_off = dh_base + rows64[:, None] * D + k_off[None, :]
                        dh_mask = row_ok[:, None] & k_ok[None, :]
                        if OWNER == 0:
                            tl.atomic_add(dh_off, part, mask=dh_mask)
                        else:
                            tl.store(dh_off, tl.load(dh_off, mask=dh_mask, other=0.0) + part, mask=dh_mask)
                    if DO_DW:
                        h = tl.load(h_ptr + h_row_off[:, None] + k_off[None, :] * stride_hd,
                                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                        if UPCAST:
                            h = h.to(tl.float32)
                        part = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
                        dw_off = dw_ptr + cols64[:, None] * D + k_off[None, :]
                        dw_mask = col_ok[:, None] & k_ok[None, :]
                        if OWNER == 0:
                            tl.atomic_add(dw_off, part, mask=dw_mask)
                        else:
                            tl.store(dw_off, tl.load(dw_off, mask=dw_mask, other=0.0) + part, mask=dw_mask)

    if DO_DB:
        if OWNER == 2:
            cols = pid0 * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(db_ptr + cols.to(tl.int64), db_acc, mask=cols < V)
