"""Dense pass of the forward: per-row online max, arg-max and log-sum-exp over a vocabulary slice.

Formula, for row i and the vocabulary slice s = [s * chunk, min((s + 1) * chunk, V)) of this shard:

    z_iv      = softcap * tanh((h_i . W_v + b_v) / softcap)      (plain h_i . W_v + b_v without softcap)
    max_is    = max_{v in s} z_iv
    arg_is    = vocab_start + first v in s with z_iv == max_is
    sumexp_is = sum_{v in s} exp(z_iv - max_is)
    zsum_is   = sum_{v in s} z_iv                              (SUM_LOGITS only: label smoothing's mean logit)

Grid: (cdiv(N, BLOCK_M), SPLITS). Program (m, s) owns rows [m * BLOCK_M, ...) and slice s, and writes
its numbers per row to slot s of the [SPLITS, N] outputs; nothing is shared between programs, so
there are no races and the merge over slices (done by the caller in a fixed order) is deterministic.
The logit tile h @ W^T is built with `tl.dot` over BLOCK_K-wide slabs of the hidden dimension and is
never written to memory.
"""
import triton
import triton.language as tl

from .logit_tile import logit_tile


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
    "SUM_LOGITS": lambda args: args["zsum_ptr"] is not None,
})
@triton.jit
def _dense_stats_kernel(
    h_ptr, w_ptr, b_ptr, max_ptr, sumexp_ptr, arg_ptr, zsum_ptr,
    N, V, D, chunk, vocab_start, softcap,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SUM_LOGITS: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols_in_tile = tl.arange(0, BLOCK_N)

    v_begin = split * chunk
    v_end = tl.minimum(v_begin + chunk, V)

    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    run_arg = tl.zeros((BLOCK_M,), tl.int64)
    run_zsum = tl.zeros((BLOCK_M,), tl.float32)

    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + cols_in_tile
        col_ok = cols < v_end
        acc = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, softcap,
                         stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                         BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION)
        if SUM_LOGITS:  # columns past V read zero weights (and bias): their logit is exactly 0
            run_zsum += tl.sum(acc, axis=1)
        acc = tl.where(col_ok[None, :], acc, float("-inf"))

        # NaN logits (NaN / inf inputs) are left out of max / argmax but reach the sum, so lse is NaN
        ranked = tl.where(acc == acc, acc, float("-inf"))
        tile_max = tl.max(ranked, axis=1)
        tile_arg = tl.argmax(ranked, axis=1, tie_break_left=True).to(tl.int64) + v0
        new_max = tl.maximum(run_max, tile_max)
        # rows whose running max is still -inf (cannot happen for a non-empty slice, but keeps exp finite)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(acc - safe_max[:, None]), axis=1)
        run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)
        run_max = new_max

    out = split.to(tl.int64) * N + rows
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sumexp_ptr + out, run_sum, mask=row_ok)
    tl.store(arg_ptr + out, run_arg + vocab_start, mask=row_ok)
    if SUM_LOGITS:
        tl.store(zsum_ptr + out, run_zsum, mask=row_ok)
