"""Indexed dot: the logits of each row at its own few ids (target, concept set, soft concept ids).

Formula, for row i and column j of the id table `ids` [N, J] (global ids; column 0 is the target y_i,
columns 1 .. S the concept set S_i, columns S+1 .. J-1 the soft ids C_ik with weights w_ik):

    in_ij  = vocab_start <= ids_ij < vocab_start + V          (ids outside this shard, and -1 pads, are out)
    z_ij   = softcap * tanh((h_i . W_{ids_ij - vocab_start} + b) / softcap)   for in_ij, else 0
    target_logit_i = z_i0 if in_i0 else 0
    set_lse_i      = log sum_{1 <= j <= S, in_ij} exp(z_ij)   (-inf when no such j)
    soft_dot_i     = sum_{j > S, in_ij} w_ij * z_ij

The work is O(N * J * D): for each column j in turn, the gathered W rows [BLOCK_R, BLOCK_K] times the
hidden rows, summed over the hidden dimension; set_lse is kept as an online log-sum-exp over j. REDUCE writes the three row statistics; STORE_Z writes z [N, J]
(used by the backward to form the sparse gradient coefficients).

Grid: (cdiv(N, BLOCK_R),); each program owns BLOCK_R rows, so there are no races.
"""
import triton
import triton.language as tl


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
})
@triton.jit
def _sparse_logits_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, soft_w_ptr,
    z_ptr, target_ptr, set_lse_ptr, soft_dot_ptr,
    N, V, D, J, S, vocab_start, softcap,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SOFT: tl.constexpr,
    REDUCE: tl.constexpr, STORE_Z: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    h_row_off = rows64 * stride_hn
    ks = tl.arange(0, BLOCK_K)
    n_soft = J - 1 - S

    target = tl.zeros((BLOCK_R,), tl.float32)
    set_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    set_sum = tl.zeros((BLOCK_R,), tl.float32)
    soft_dot = tl.zeros((BLOCK_R,), tl.float32)
    for j in range(0, J):
        ids = tl.load(ids_ptr + rows64 * J + j, mask=row_ok, other=-1)
        local = ids - vocab_start
        hit = row_ok & (local >= 0) & (local < V)
        local = tl.where(hit, local, 0)
        w_row_off = local * stride_wv
        z = tl.zeros((BLOCK_R,), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            k_ok = k < D
            k_off = k.to(tl.int64)
            h = tl.load(h_ptr + h_row_off[:, None] + k_off[None, :] * stride_hd,
                        mask=hit[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + w_row_off[:, None] + k_off[None, :] * stride_wd,
                        mask=hit[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            z += tl.sum(h * w, axis=1)
        if HAS_BIAS:
            z += tl.load(b_ptr + local * stride_b, mask=hit, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
        z = tl.where(hit, z, 0.0)
        if STORE_Z:
            tl.store(z_ptr + rows64 * J + j, z, mask=row_ok)
        if REDUCE:
            target += tl.where(hit & (j == 0), z, 0.0)
            in_set = hit & (j >= 1) & (j <= S)
            new_max = tl.maximum(set_max, tl.where(in_set, z, float("-inf")))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            set_sum = set_sum * tl.exp(set_max - safe_max) + tl.where(in_set, tl.exp(z - safe_max), 0.0)
            set_max = new_max
            if HAS_SOFT:
                in_soft = hit & (j > S)
                wk = tl.load(soft_w_ptr + rows64 * n_soft + (j - 1 - S), mask=in_soft, other=0.0)
                soft_dot += tl.where(in_soft, wk.to(tl.float32) * z, 0.0)

    if REDUCE:
        tl.store(target_ptr + rows64, target, mask=row_ok)
        empty = set_max == float("-inf")
        set_lse = tl.where(empty, float("-inf"), set_max + tl.log(tl.where(empty, 1.0, set_sum)))
        tl.store(set_lse_ptr + rows64, set_lse, mask=row_ok)
        if HAS_SOFT:
            tl.store(soft_dot_ptr + rows64, soft_dot, mask=row_ok)
