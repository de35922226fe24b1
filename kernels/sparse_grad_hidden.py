"""Sparse part of the backward for the hidden states: add the K+1 signed coefficients per row.

Formula, for row i with id table ids [N, J] and signed coefficients s [N, J] (zero where the id is not
in this shard; s = -coef_target at the target, -coef_set * q at the concept ids, times the softcap
derivative, prepared by the caller):

    dH_i += sum_j s_ij * W_{ids_ij - vocab_start}

Grid: (cdiv(N, BLOCK_R), cdiv(D, BLOCK_K)); each program owns a [BLOCK_R, BLOCK_K] block of dH and
updates it with a plain load and store, so repeated ids in a row and repeated runs are deterministic.
Must run after the dense kernel has finished with dH (same stream).
"""
import triton
import triton.language as tl


@triton.jit
def _sparse_grad_hidden_kernel(
    w_ptr, ids_ptr, s_ptr, dh_ptr,
    N, V, D, J, vocab_start,
    stride_wv, stride_wd,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < D
    k_off = k.to(tl.int64)
    part = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
    for j in range(0, J):
        ids = tl.load(ids_ptr + rows64 * J + j, mask=row_ok, other=-1)
        local = ids - vocab_start
        hit = row_ok & (local >= 0) & (local < V)
        local = tl.where(hit, local, 0)
        s = tl.load(s_ptr + rows64 * J + j, mask=hit, other=0.0)
        w = tl.load(w_ptr + (local * stride_wv)[:, None] + (k_off * stride_wd)[None, :],
                    mask=hit[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        part += s[:, None] * w
    dh_off = dh_ptr + rows64[:, None] * D + k_off[None, :]
    dh_mask = row_ok[:, None] & k_ok[None, :]
    tl.store(dh_off, tl.load(dh_off, mask=dh_mask, other=0.0) + part, mask=dh_mask)
