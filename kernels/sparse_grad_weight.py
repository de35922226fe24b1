"""Sparse part of the backward for the head: scatter the K+1 signed coefficients per row into W rows.

Formula, over the (row i, id v) pairs with a nonzero signed coefficient s (see sparse_grad_hidden.py),
grouped by id v (the caller sorts the pairs by id, stably, and gives each distinct id a segment
[seg_start[u], seg_start[u+1]) of the sorted arrays):

    dW_v += sum_{pairs (i, v)} s * h_i          db_v += sum_{pairs (i, v)} s

Grid: (cdiv(U, BLOCK_U), cdiv(D, BLOCK_K)) for U distinct ids. Each program owns BLOCK_U distinct W rows
(a [BLOCK_U, BLOCK_K] block), walks their segments in sorted order and updates with a plain load and
store: no atomics, so ids shared by many rows (frequent tokens) add up in the same order every run.
"""
import triton
import triton.language as tl


@triton.jit
def _sparse_grad_weight_kernel(
    h_ptr, seg_start_ptr, seg_id_ptr, pair_row_ptr, pair_s_ptr, dw_ptr, db_ptr,
    U, D,
    stride_hn, stride_hd,
    BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, DO_DW: tl.constexpr, DO_DB: tl.constexpr,
):
    pid_u = tl.program_id(0)
    pid_k = tl.program_id(1)
    us = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = us < U
    start = tl.load(seg_start_ptr + us, mask=u_ok, other=0)
    end = tl.load(seg_start_ptr + us + 1, mask=u_ok, other=0)
    vid = tl.load(seg_id_ptr + us, mask=u_ok, other=0)
    longest = tl.max(end - start, axis=0)

    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < D
    k_off = k.to(tl.int64)
    acc = tl.zeros((BLOCK_U, BLOCK_K), tl.float32)
    s_sum = tl.zeros((BLOCK_U,), tl.float32)
    for e in range(0, longest):
        idx = start + e
        live = u_ok & (idx < end)
        row = tl.load(pair_row_ptr + idx, mask=live, other=0)
        s = tl.load(pair_s_ptr + idx, mask=live, other=0.0)
        if DO_DW:
            h = tl.load(h_ptr + (row * stride_hn)[:, None] + (k_off * stride_hd)[None, :],
                        mask=live[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc += s[:, None] * h
        s_sum += s
    if DO_DW:
        dw_off = dw_ptr + (vid * D)[:, None] + k_off[None, :]
        dw_mask = u_ok[:, None] & k_ok[None, :]
        tl.store(dw_off, tl.load(dw_off, mask=dw_mask, other=0.0) + acc, mask=dw_mask)
    if DO_DB:
        if pid_k == 0:
            tl.store(db_ptr + vid, tl.load(db_ptr + vid, mask=u_ok, other=0.0) + s_sum, mask=u_ok)
