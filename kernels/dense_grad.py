"""Dense pass of the backward: recompute the logits tile by tile and form the dense gradient term.

Formula, with the GLOBAL per-row statistics lse_i and one scalar coefficient c_i per row (coef_dense):

    z_iv   = softcap * tanh(r_iv / softcap),   r_iv = h_i . W_v + b_v   (z = r without softcap)
    dr_iv  = (c_i * exp(z_iv - lse_i) - u_i) * (1 - (z_iv / softcap)^2)  (last factor only with softcap;
                                                                          u_i (coef_uniform) only with
                                                                          label smoothing: HAS_UNIFORM)
    dH_i  += sum_v dr_iv W_v        dW_v += sum_i dr_iv h_i        db_v += sum_i dr_iv

(the sparse part of the gradient, at the K+1 ids of each row, is added by the sparse kernels, except
with OWNER_CHUNK, which adds it to the tile itself, below).
Who owns which output decides the grid. OWNER is a constexpr taking one of the module's constants
below, which the launcher (fused_concept/_triton_path.py) passes by name:

    OWNER_ATOMIC   grid (cdiv(N, BLOCK_M), cdiv(V, BLOCK_N)): one logit tile per program, its products
                   added to the float32 dH / dW / db with atomics (order of additions not fixed).
    OWNER_ROWS     grid (cdiv(N, BLOCK_M), SLICES): a program owns BLOCK_M rows of the dH partial of its
                   vocabulary slice [s * chunk, (s + 1) * chunk) (buffer [SLICES, N, D]; the caller sums
                   the slices in order) and sweeps the slice in order: deterministic.
    OWNER_COLUMNS  grid (P,): persistent programs; program p owns the vocabulary tiles p, p + P, ... of
                   dW and db and sweeps all rows in order for each: deterministic.
    OWNER_CHUNK    grid (cdiv(N, BLOCK_M), cdiv(V, BLOCK_N)): writes dr of every tile to scratch [N, V]
                   (row stride `chunk`) in the input dtype. The caller passes one vocabulary chunk of
                   W / b (V = chunk width) and multiplies the result out with chunk_matmul.py: the
                   logits are recomputed once for dH and dW together, deterministically. With
                   HAS_SPARSE (J > 0) the sparse terms are added to the float32 tile before its one
                   rounding to the input dtype: for j = 0 .. J-1 in order, dr[i, loc[i, j] - id_base] +=
                   sp[i, j], with loc [N, J] int32 the shard-local ids (-1 pads) and sp [N, J] float32 the
                   signed sparse coefficients (softcap derivative included). So dr = p - 1 at a confident
                   target is formed in float32 (no cancellation against an already rounded p).

OWNER_ROWS and OWNER_COLUMNS work in groups of GROUP tiles: phase 1 recomputes GROUP logit tiles and
parks their dr (in the input dtype) in the program's own scratch slab [BLOCK_M, GROUP * BLOCK_N]
(L2-resident); phase 2 multiplies the slab by W (or h) in BLOCK_D-wide column blocks, a matrix product
with a GROUP * BLOCK_N deep reduction, and adds each block to the float32 output once per group.

FILTER: a tile whose every softmax probability exp(z_iv - lse_i) is below filter_eps has its dense part
dropped. OWNER_ATOMIC skips the tile's products; OWNER_ROWS / OWNER_COLUMNS zero it and skip phase 2
when the whole group is dropped; OWNER_CHUNK zeroes it and writes keep[tile] = 0 to the [cdiv(N,
BLOCK_M), cdiv(V, BLOCK_N)] int8 tile map (1 where the tile keeps a dense part or holds a nonzero sparse
term), from which chunk_matmul.py skips the tile in both products.
"""
import triton
import triton.language as tl

from .logit_tile import logit_tile

OWNER_ATOMIC = tl.constexpr(0)
OWNER_ROWS = tl.constexpr(1)
OWNER_COLUMNS = tl.constexpr(2)
OWNER_CHUNK = tl.constexpr(3)


@triton.jit
def _logit_grad_tile(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, rows, cols, N, V, D, softcap, filter_eps,
                     stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr, FILTER: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(dr [BLOCK_M, BLOCK_N] float32, keep); 0 outside N x V. With FILTER, keep says whether the tile's
    largest softmax probability reaches filter_eps, and a dropped tile's dr is 0; without, keep is True."""
    row_ok = rows < N
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    acc = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, softcap,
                     stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                     BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows64, mask=row_ok, other=0.0)
    prob = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(acc - lse[:, None]), 0.0)
    dz = coef[:, None] * prob
    if HAS_UNIFORM:  # label smoothing: the same amount off every id of the vocabulary (0 on rows past N)
        uni = tl.load(uni_ptr + rows64, mask=row_ok, other=0.0)
        dz = tl.where(col_ok[None, :], dz - uni[:, None], 0.0)
    if HAS_SOFTCAP:
        t = acc / softcap  # tanh of the raw logit / softcap
        dz = dz * (1.0 - t * t)
    keep = True
    if FILTER:
        keep = tl.max(tl.max(prob, axis=1), axis=0) >= filter_eps
        dz = tl.where(keep, dz, 0.0)
    return dz, keep


@triton.jit
def _atomic_tile(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, dh_ptr, dw_ptr, db_ptr, N, V, D, softcap, filter_eps,
                 stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                 DO_DH: tl.constexpr, DO_DW: tl.constexpr, DO_DB: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr, FILTER: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """OWNER_ATOMIC: one (row tile, vocabulary tile); its dH / dW / db products added with atomics."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ad = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    dz, keep = _logit_grad_tile(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, rows, cols, N, V, D,
        softcap, filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
        BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, FILTER, UPCAST, DOT_PRECISION)
    if keep:
        if DO_DB:
            tl.atomic_add(db_ptr + cols64, tl.sum(dz, axis=0), mask=col_ok)
        if UPCAST:  # the interpreter multiplies float32 operands
            op_ty = tl.float32
        else:
            op_ty = w_ptr.dtype.element_ty
        dz_op = dz.to(op_ty)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + ad
            d_ok = d < D
            d_off = d.to(tl.int64)
            if DO_DH:
                w = tl.load(w_ptr + cols64[:, None] * stride_wv + d_off[None, :] * stride_wd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(op_ty)
                part = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_ptr + rows64[:, None] * D + d_off[None, :], part, mask=row_ok[:, None] & d_ok[None, :])
            if DO_DW:
                h = tl.load(h_ptr + rows64[:, None] * stride_hn + d_off[None, :] * stride_hd,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(op_ty)
                part = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptr + cols64[:, None] * D + d_off[None, :], part, mask=col_ok[:, None] & d_ok[None, :])


@triton.jit
def _row_sweep(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, dh_ptr, scratch_ptr, N, V, D, chunk, softcap,
               filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr,
               FILTER: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """OWNER_ROWS: BLOCK_M rows of the dH partial of vocabulary slice program_id(1), swept in groups."""
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    am = tl.arange(0, BLOCK_M)
    an = tl.arange(0, BLOCK_N)
    ad = tl.arange(0, BLOCK_D)
    if UPCAST:  # the interpreter multiplies float32 operands
        op_ty = tl.float32
    else:
        op_ty = w_ptr.dtype.element_ty
    rows = pid0 * BLOCK_M + am
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    slot = (pid1 * tl.num_programs(0) + pid0).to(tl.int64)
    scratch = scratch_ptr + slot * (BLOCK_M * GROUP * BLOCK_N)
    dh_base = dh_ptr + pid1.to(tl.int64) * N * D
    first_tile = pid1 * (chunk // BLOCK_N)
    n_tiles = tl.cdiv(tl.minimum(chunk, V - pid1 * chunk), BLOCK_N)
    for g0 in range(0, n_tiles, GROUP):
        n_sub = tl.minimum(GROUP, n_tiles - g0)
        kept = 0
        for sub in range(0, n_sub):
            cols = (first_tile + g0 + sub) * BLOCK_N + an
            dz, keep = _logit_grad_tile(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, rows, cols, N, V, D,
                softcap, filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, FILTER, UPCAST, DOT_PRECISION)
            if keep:
                kept += 1
            tl.store(scratch + am[:, None] * (GROUP * BLOCK_N) + (sub * BLOCK_N + an)[None, :], dz.to(op_ty))
        tl.debug_barrier()  # the slab is written by every thread of the program before it is read
        if kept > 0:
            for d0 in range(0, D, BLOCK_D):
                d = d0 + ad
                d_ok = d < D
                d_off = d.to(tl.int64)
                acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
                for sub in range(0, n_sub):
                    cols64 = ((first_tile + g0 + sub) * BLOCK_N + an).to(tl.int64)
                    dz_t = tl.load(scratch + am[:, None] * (GROUP * BLOCK_N) + (sub * BLOCK_N + an)[None, :])
                    w = tl.load(w_ptr + cols64[:, None] * stride_wv + d_off[None, :] * stride_wd,
                                mask=(cols64 < V)[:, None] & d_ok[None, :], other=0.0).to(op_ty)
                    acc = tl.dot(dz_t, w, acc, input_precision=DOT_PRECISION)
                out = dh_base + rows64[:, None] * D + d_off[None, :]
                out_ok = row_ok[:, None] & d_ok[None, :]
                tl.store(out, tl.load(out, mask=out_ok, other=0.0) + acc, mask=out_ok)
        tl.debug_barrier()  # everyone has read the slab before the next group overwrites it


@triton.jit
def _column_sweep(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, dw_ptr, db_ptr, scratch_ptr, N, V, D, softcap,
                  filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                  GROUP: tl.constexpr, DO_DW: tl.constexpr, DO_DB: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr, FILTER: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """OWNER_COLUMNS: persistent; vocabulary tiles pid, pid + P, ... of dW / db, all rows swept in groups."""
    pid0 = tl.program_id(0)
    am = tl.arange(0, BLOCK_M)
    an = tl.arange(0, BLOCK_N)
    ad = tl.arange(0, BLOCK_D)
    if UPCAST:  # the interpreter multiplies float32 operands
        op_ty = tl.float32
    else:
        op_ty = w_ptr.dtype.element_ty
    scratch = scratch_ptr + pid0.to(tl.int64) * (GROUP * BLOCK_M * BLOCK_N)
    row_tiles = tl.cdiv(N, BLOCK_M)
    for tile_n in range(pid0, tl.cdiv(V, BLOCK_N), tl.num_programs(0)):
        cols = tile_n * BLOCK_N + an
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        db_acc = tl.zeros((BLOCK_N,), tl.float32)
        for g0 in range(0, row_tiles, GROUP):
            n_sub = tl.minimum(GROUP, row_tiles - g0)
            kept = 0
            for sub in range(0, n_sub):
                rows = (g0 + sub) * BLOCK_M + am
                dz, keep = _logit_grad_tile(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, rows, cols, N, V, D,
                    softcap, filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                    BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, FILTER, UPCAST, DOT_PRECISION)
                if keep:
                    kept += 1
                if DO_DB:
                    db_acc += tl.sum(dz, axis=0)
                if DO_DW:
                    # parked transposed: [BLOCK_N, GROUP * BLOCK_M], row v holds dr_{., v} of the group
                    tl.store(scratch + an[:, None] * (GROUP * BLOCK_M) + (sub * BLOCK_M + am)[None, :],
                             tl.trans(dz.to(op_ty)))
            tl.debug_barrier()
            if DO_DW and kept > 0:
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + ad
                    d_ok = d < D
                    d_off = d.to(tl.int64)
                    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
                    for sub in range(0, n_sub):
                        rows64 = ((g0 + sub) * BLOCK_M + am).to(tl.int64)
                        dz_t = tl.load(scratch + an[:, None] * (GROUP * BLOCK_M) + (sub * BLOCK_M + am)[None, :])
                        h = tl.load(h_ptr + rows64[:, None] * stride_hn + d_off[None, :] * stride_hd,
                                    mask=(rows64 < N)[:, None] & d_ok[None, :], other=0.0).to(op_ty)
                        acc = tl.dot(dz_t, h, acc, input_precision=DOT_PRECISION)
                    out = dw_ptr + cols64[:, None] * D + d_off[None, :]
                    out_ok = col_ok[:, None] & d_ok[None, :]
                    tl.store(out, tl.load(out, mask=out_ok, other=0.0) + acc, mask=out_ok)
            tl.debug_barrier()
        if DO_DB:
            tl.store(db_ptr + cols64, db_acc, mask=col_ok)


@triton.jit
def _chunk_tile(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, scratch_ptr, keep_ptr, loc_ptr, sp_ptr, J, id_base,
                N, V, D, chunk, softcap, filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr, FILTER: tl.constexpr, HAS_SPARSE: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """OWNER_CHUNK: one tile of the chunk's logit gradient dR (sparse terms included) into scratch;
    with FILTER, its entry of the keep map."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    dz, keep = _logit_grad_tile(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, rows, cols, N, V, D,
        softcap, filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
        BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, FILTER, UPCAST, DOT_PRECISION)
    sparse_rows = tl.zeros((BLOCK_M,), tl.int32)  # rows with a nonzero sparse term in this tile
    if HAS_SPARSE:
        # the sparse terms are exact: added after the filter, in float32, in a fixed order (j)
        col0 = tl.program_id(1) * BLOCK_N
        for j in range(0, J):
            loc = tl.load(loc_ptr + rows64 * J + j, mask=row_ok, other=-1) - id_base
            sp = tl.load(sp_ptr + rows64 * J + j, mask=row_ok, other=0.0)
            dz += tl.where(loc[:, None] == cols[None, :], sp[:, None], 0.0)
            sparse_rows |= ((loc >= col0) & (loc < col0 + BLOCK_N) & (sp != 0.0)).to(tl.int32)
    tl.store(scratch_ptr + rows64[:, None] * chunk + cols[None, :], dz.to(scratch_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < V)[None, :])
    if FILTER:
        keep = keep | (tl.max(sparse_rows, axis=0) > 0)
        tl.store(keep_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), keep.to(tl.int8))


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
    "FILTER": lambda args: args["filter_eps"] > 0,
    "HAS_SPARSE": lambda args: args["J"] > 0,
    "HAS_UNIFORM": lambda args: args["uni_ptr"] is not None,
})
@triton.jit
def _dense_grad_kernel(
    h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, dh_ptr, dw_ptr, db_ptr, scratch_ptr, keep_ptr, loc_ptr, sp_ptr,
    J, id_base, N, V, D, chunk, softcap, filter_eps,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    OWNER: tl.constexpr, DO_DH: tl.constexpr, DO_DW: tl.constexpr, DO_DB: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr, FILTER: tl.constexpr,
    HAS_SPARSE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One entry point for the four owner modes (constexpr OWNER); each mode is one device function."""
    if OWNER == OWNER_ATOMIC:
        _atomic_tile(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, dh_ptr, dw_ptr, db_ptr, N, V, D, softcap,
                     filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                     BLOCK_D, DO_DH, DO_DW, DO_DB, HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, FILTER, UPCAST, DOT_PRECISION)
    elif OWNER == OWNER_ROWS:
        _row_sweep(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, dh_ptr, scratch_ptr, N, V, D, chunk, softcap,
                   filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                   BLOCK_D, GROUP, HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, FILTER, UPCAST, DOT_PRECISION)
    elif OWNER == OWNER_COLUMNS:
        _column_sweep(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, dw_ptr, db_ptr, scratch_ptr, N, V, D, softcap,
                      filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                      BLOCK_D, GROUP, DO_DW, DO_DB, HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, FILTER, UPCAST, DOT_PRECISION)
    else:
        tl.static_assert(OWNER == OWNER_CHUNK)
        _chunk_tile(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, uni_ptr, scratch_ptr, keep_ptr, loc_ptr, sp_ptr, J, id_base,
                    N, V, D, chunk, softcap, filter_eps, stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                    BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, FILTER, HAS_SPARSE, UPCAST,
                    DOT_PRECISION)
