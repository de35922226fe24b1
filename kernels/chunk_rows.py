"""Row statistics and the logit gradient of one chunk of rows, written in place over the chunk's logits
(strategy "rows" of the Triton path: the logits come from cuBLAS, this kernel does everything else).

Input: zbuf [C, V] (row stride stride_z, unit column stride), the chunk's raw logits h_c W^T as the
matrix product wrote them (the input dtype; float32 for float32 inputs), V this shard's ids, global ids
vocab_start .. vocab_start + V - 1. Per row i, with r = zbuf + b and z = softcap * tanh(r / softcap)
(z = r without softcap), and the id table ids [C, J] (column 0 the target y_i, columns 1 .. S the
concept set S_i, columns S+1 .. J-1 the soft ids C_ik with weights w_ik; -1 pads):

FUSED (the forward of a summed loss, docs/internals.md `stats_and_grads`): pass 1 over the row in
BLOCK_V-wide blocks gives

    max_i, argmax_i (the lowest id of the maximum; NaN left out), lse_i = max_i + log sum_v exp(z_iv - max_i),
    zsum_i = sum_v z_iv (SUM_LOGITS: label smoothing's mean logit)

the gather at the row's ids gives target_logit_i = z_iy (0 when y is not in the shard), set_lse_i =
log sum_{t in S_i} exp z_it (-inf when none), soft_dot_i = sum_k w_ik z_iC_ik; then the row math of
fused_concept/core/rowmath.py for the upstream gradient g_i (the row's scale: 1 for "sum", 1 / N_valid
for "mean"), alpha_i, beta_i:

    mass_i = exp(set_lse_i - lse_i) (0 without a set),  hinge_i = [mass_i < margin] (1 without a margin)
    coef_dense_i  = g_i (alpha_i + beta_i hinge_i [has set] + 2 z_loss lse_i)   (0 on ignored rows)
    coef_target_i = g_i alpha_i (1 - eps),  coef_uniform_i = g_i alpha_i eps / V_global,
    coef_set_i    = g_i beta_i hinge_i [has set]

and the statistics are written. GIVEN (the backward from merged statistics, any vocabulary shard):
lse, set_lse and the four coefficients are read. Then, in both modes,

    pass 2    dz_iv = (coef_dense_i exp(z_iv - lse_i) - coef_uniform_i) * (1 - (z_iv / softcap)^2)
              written over zbuf, one rounding to its dtype (the softcap factor only with a softcap)
    fix-up    at each id t of the row in the shard, the same dense value plus, in float32, the sum of
              the row's sparse terms at t (-coef_target at the target; -coef_set exp(z_t - set_lse) at
              the set ids (marginal) or -coef_set w_k at the soft ids, which add up when repeated),
              times the softcap factor, stored once: p - 1 at a confident target is formed before the
              rounding.

The row is read twice (FUSED) or once (GIVEN) and written once. Barriers order the gather before pass 2's
writes and pass 2's writes before the fix-up's (other threads of the program touch the same addresses).
Ignored rows (target -1) have zero coefficients. EMULATE_RNE (the interpreter, whose float32 -> bfloat16
cast truncates) rounds to nearest even by hand before a bfloat16 store.
Grid: (cdiv(C, BLOCK_R),); a program owns BLOCK_R rows; nothing is shared between programs.
All offsets are 64-bit.
"""
import triton
import triton.language as tl


@triton.jit
def _logits(z_ptr, b_ptr, row_off, cols, ok, stride_b, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Float32 z at the [rows, cols] offsets (row_off [R, 1], cols [R or 1, X]), 0 where not ok."""
    cols64 = cols.to(tl.int64)
    z = tl.load(z_ptr + row_off + cols64, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols64 * stride_b, mask=ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def _stored(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """x cast to `dtype` for a store; with EMULATE_RNE a bfloat16 target is rounded to nearest even first."""
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dense(z, lse, coef_dense, coef_uni, softcap, HAS_UNIFORM: tl.constexpr):
    """coef_dense exp(z - lse) - coef_uniform (the softcap factor is applied by the caller)."""
    dz = coef_dense[:, None] * tl.exp(z - lse[:, None])
    if HAS_UNIFORM:
        dz = dz - coef_uni[:, None]
    return dz


@triton.jit
def _cap_factor(dz, z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        t = z / softcap
        dz = dz * (1.0 - t * t)
    return dz


@triton.jit
def _row_stats(z_ptr, b_ptr, row_off, row_ok, V, stride_b, softcap, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SUM_LOGITS: tl.constexpr):
    """Pass 1: (max, argmax (local id), sum exp(z - max), sum z) per row, online over BLOCK_V blocks."""
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_R,), tl.float32)
    run_arg = tl.zeros((BLOCK_R,), tl.int64)
    run_zsum = tl.zeros((BLOCK_R,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        ok = row_ok[:, None] & col_ok[None, :]
        z = _logits(z_ptr, b_ptr, row_off, cols[None, :], ok, stride_b, softcap, HAS_BIAS, HAS_SOFTCAP)
        if SUM_LOGITS:
            run_zsum += tl.sum(tl.where(ok, z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        ranked = tl.where(z == z, z, float("-inf"))  # NaN stays out of max / argmax but reaches the sum
        tile_max = tl.max(ranked, axis=1)
        tile_arg = tl.argmax(ranked, axis=1, tie_break_left=True).to(tl.int64) + v0
        new_max = tl.maximum(run_max, tile_max)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(z - safe[:, None]), axis=1)
        run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)  # strict: the earlier block keeps ties
        run_max = new_max
    return run_max, run_arg, run_sum, run_zsum


@triton.jit
def _gather(z_ptr, b_ptr, ids_ptr, soft_w_ptr, rows64, row_off, row_ok, V, J, S, vocab_start, stride_b, softcap,
            BLOCK_J: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SOFT: tl.constexpr):
    """The row's ids: (loc [R, BLOCK_J] shard-local ids, -1 outside; z there; soft weights; target_logit,
    set_lse, soft_dot, valid, has_set) per row."""
    jj = tl.arange(0, BLOCK_J)[None, :]
    ids = tl.load(ids_ptr + rows64[:, None] * J + jj, mask=row_ok[:, None] & (jj < J), other=-1)
    local = ids - vocab_start
    inside = (ids >= 0) & (local >= 0) & (local < V)
    loc = tl.where(inside, local, -1)
    zj = _logits(z_ptr, b_ptr, row_off, tl.where(inside, local, 0), inside, stride_b, softcap, HAS_BIAS, HAS_SOFTCAP)
    is_set = (jj >= 1) & (jj <= S)
    target_logit = tl.sum(tl.where((jj == 0) & inside, zj, 0.0), axis=1)
    set_z = tl.where(is_set & inside, zj, float("-inf"))
    set_max = tl.max(set_z, axis=1)
    safe = tl.where(set_max == float("-inf"), 0.0, set_max)
    set_lse = safe + tl.log(tl.sum(tl.exp(set_z - safe[:, None]), axis=1))  # -inf when no set id is inside
    w = tl.zeros((1, BLOCK_J), tl.float32)
    soft_dot = tl.zeros_like(target_logit)
    if HAS_SOFT:
        is_soft = (jj > S) & inside
        w = tl.load(soft_w_ptr + rows64[:, None] * (J - 1 - S) + (jj - 1 - S), mask=is_soft, other=0.0)
        soft_dot = tl.sum(tl.where(is_soft, w * zj, 0.0), axis=1)
    valid = tl.sum(((jj == 0) & (ids >= 0)).to(tl.int32), axis=1) > 0
    has_set = tl.sum((is_set & (ids >= 0)).to(tl.int32), axis=1) > 0
    return loc, zj, w, target_logit, set_lse, soft_dot, valid, has_set


@triton.jit
def _fused_coefs(g_ptr, alpha_ptr, beta_ptr, rows64, row_ok, lse, set_lse, valid, has_set, margin, z_loss,
                 target_scale, uni_scale, HAS_MARGIN: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                 HAS_UNIFORM: tl.constexpr):
    """rowmath.grad_coefficients in the kernel: (coef_dense, coef_target, coef_set, coef_uniform)."""
    g = tl.load(g_ptr + rows64, mask=row_ok, other=0.0)
    alpha = tl.load(alpha_ptr + rows64, mask=row_ok, other=0.0)
    beta = tl.load(beta_ptr + rows64, mask=row_ok, other=0.0)
    mass = tl.where(has_set, tl.exp(tl.where(has_set, set_lse, lse) - lse), 0.0)
    hinge = tl.full(lse.shape, 1.0, tl.float32)
    if HAS_MARGIN:  # NaN mass keeps the NaN
        hinge = tl.where(mass != mass, mass, (mass < margin).to(tl.float32))
    set_term = tl.where(has_set, beta * hinge, 0.0)
    dense = alpha + set_term
    if HAS_ZLOSS:
        dense = dense + 2.0 * z_loss * lse
    token = tl.where(valid, g * alpha, 0.0)
    coef_target = token
    coef_uni = tl.zeros_like(token)
    if HAS_UNIFORM:
        coef_target = token * target_scale
        coef_uni = token * uni_scale
    return tl.where(valid, g * dense, 0.0), coef_target, tl.where(valid, g * set_term, 0.0), coef_uni


@triton.jit
def _sparse_terms(loc, zj, w, set_lse, coef_target, coef_set, S, BLOCK_J: tl.constexpr, HAS_SOFT: tl.constexpr):
    """[R, BLOCK_J] float32: what each (row, id) adds to dz at that id (0 outside the shard)."""
    jj = tl.arange(0, BLOCK_J)[None, :]
    sp = tl.where(jj == 0, -coef_target[:, None], 0.0)
    if HAS_SOFT:
        sp += tl.where(jj > S, -coef_set[:, None] * w, 0.0)
    else:
        safe_set = tl.where(tl.abs(set_lse) < float("inf"), set_lse, 0.0)
        sp += tl.where((jj >= 1) & (jj <= S), -coef_set[:, None] * tl.exp(zj - safe_set[:, None]), 0.0)
    return tl.where(loc >= 0, sp, 0.0)


@triton.jit
def _grad_pass(z_ptr, b_ptr, row_off, row_ok, V, stride_b, softcap, lse, coef_dense, coef_uni,
               BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr,
               EMULATE_RNE: tl.constexpr):
    """Pass 2: the dense part of dz over the whole row, stored over the logits."""
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V))[None, :]
        ok = row_ok[:, None] & (cols < V)
        z = _logits(z_ptr, b_ptr, row_off, cols, ok, stride_b, softcap, HAS_BIAS, HAS_SOFTCAP)
        dz = _cap_factor(_dense(z, lse, coef_dense, coef_uni, softcap, HAS_UNIFORM), z, softcap, HAS_SOFTCAP)
        tl.store(z_ptr + row_off + cols.to(tl.int64), _stored(dz, z_ptr.dtype.element_ty, EMULATE_RNE), mask=ok)


@triton.jit
def _fix_sparse(z_ptr, row_off, row_ok, loc, zj, sp, lse, coef_dense, coef_uni, J, softcap,
                BLOCK_J: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr,
                EMULATE_RNE: tl.constexpr):
    """At each id of the row: dense part + every sparse term at that id, in float32, stored once."""
    jj = tl.arange(0, BLOCK_J)[None, :]
    total = tl.zeros_like(sp)
    for j in range(0, J):
        pick = jj == j
        loc_j = tl.sum(tl.where(pick, loc, 0), axis=1)
        sp_j = tl.sum(tl.where(pick, sp, 0.0), axis=1)
        total += tl.where((loc == loc_j[:, None]) & (loc_j >= 0)[:, None], sp_j[:, None], 0.0)
    dz = _cap_factor(_dense(zj, lse, coef_dense, coef_uni, softcap, HAS_UNIFORM) + total, zj, softcap, HAS_SOFTCAP)
    tl.store(z_ptr + row_off + tl.where(loc >= 0, loc, 0), _stored(dz, z_ptr.dtype.element_ty, EMULATE_RNE),
             mask=row_ok[:, None] & (loc >= 0))


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
    "HAS_SOFT": lambda args: args["soft_w_ptr"] is not None,
    "FUSED": lambda args: args["g_ptr"] is not None,
    "HAS_MARGIN": lambda args: args["margin"] > 0,
    "HAS_ZLOSS": lambda args: args["z_loss"] > 0,
    "HAS_UNIFORM": lambda args: args["uni_ptr"] is not None or args["uni_scale"] > 0,
    "SUM_LOGITS": lambda args: args["zsum_ptr"] is not None,
})
@triton.jit
def _chunk_rows_kernel(
    z_ptr, b_ptr, ids_ptr, soft_w_ptr,
    g_ptr, alpha_ptr, beta_ptr,  # FUSED inputs
    coef_dense_ptr, coef_target_ptr, coef_set_ptr, uni_ptr,  # GIVEN inputs
    # FUSED outputs (lse and set_lse are GIVEN's inputs)
    max_ptr, arg_ptr, lse_ptr, target_ptr, set_lse_ptr, soft_dot_ptr, zsum_ptr,
    C, V, J, S, vocab_start, softcap, margin, z_loss, target_scale, uni_scale, stride_z, stride_b,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SOFT: tl.constexpr, FUSED: tl.constexpr,
    HAS_MARGIN: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_UNIFORM: tl.constexpr, SUM_LOGITS: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < C
    rows64 = rows.to(tl.int64)
    row_off = (rows64 * stride_z)[:, None]
    if FUSED:
        run_max, run_arg, run_sum, run_zsum = _row_stats(z_ptr, b_ptr, row_off, row_ok, V, stride_b, softcap,
                                                         BLOCK_R, BLOCK_V, HAS_BIAS, HAS_SOFTCAP, SUM_LOGITS)
        lse = run_max + tl.log(run_sum)
    else:
        lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    loc, zj, w, target_logit, set_lse, soft_dot, valid, has_set = _gather(
        z_ptr, b_ptr, ids_ptr, soft_w_ptr, rows64, row_off, row_ok, V, J, S, vocab_start, stride_b, softcap,
        BLOCK_J, HAS_BIAS, HAS_SOFTCAP, HAS_SOFT)
    if FUSED:
        coef_dense, coef_target, coef_set, coef_uni = _fused_coefs(
            g_ptr, alpha_ptr, beta_ptr, rows64, row_ok, lse, set_lse, valid, has_set, margin, z_loss,
            target_scale, uni_scale, HAS_MARGIN, HAS_ZLOSS, HAS_UNIFORM)
        tl.store(max_ptr + rows64, run_max, mask=row_ok)
        tl.store(arg_ptr + rows64, run_arg + vocab_start, mask=row_ok)
        tl.store(lse_ptr + rows64, lse, mask=row_ok)
        tl.store(target_ptr + rows64, target_logit, mask=row_ok)
        tl.store(set_lse_ptr + rows64, set_lse, mask=row_ok)
        tl.store(soft_dot_ptr + rows64, soft_dot, mask=row_ok)
        if SUM_LOGITS:
            tl.store(zsum_ptr + rows64, run_zsum, mask=row_ok)
    else:
        set_lse = tl.load(set_lse_ptr + rows64, mask=row_ok, other=0.0)
        coef_dense = tl.load(coef_dense_ptr + rows64, mask=row_ok, other=0.0)
        coef_target = tl.load(coef_target_ptr + rows64, mask=row_ok, other=0.0)
        coef_set = tl.load(coef_set_ptr + rows64, mask=row_ok, other=0.0)
        coef_uni = tl.zeros_like(coef_dense)
        if HAS_UNIFORM:
            coef_uni = tl.load(uni_ptr + rows64, mask=row_ok, other=0.0)
    sp = _sparse_terms(loc, zj, w, set_lse, coef_target, coef_set, S, BLOCK_J, HAS_SOFT)
    tl.debug_barrier()  # every gather of the logits is done before pass 2 overwrites them
    _grad_pass(z_ptr, b_ptr, row_off, row_ok, V, stride_b, softcap, lse, coef_dense, coef_uni,
               BLOCK_V, HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, EMULATE_RNE)
    tl.debug_barrier()  # pass 2's stores land before the fix-up's at the same ids
    _fix_sparse(z_ptr, row_off, row_ok, loc, zj, sp, lse, coef_dense, coef_uni, J, softcap,
                BLOCK_J, HAS_SOFTCAP, HAS_UNIFORM, EMULATE_RNE)
