"""The Triton path: steps 1 and 3 of docs/internals.md on fused kernels; [N, V] logits never exist.

Forward (`triton_partial_stats`):
  * `_dense_stats_kernel` sweeps the vocabulary in `tl.dot` tiles of h W^T (+ b, softcap) and keeps an
    online max / arg-max / sum of exp per row. When there are too few row tiles to fill the GPU the
    vocabulary is split into slices, one program per (row tile, slice); each writes its own slot of a
    [slices, N] buffer and the slices are merged here, in id order (no atomics, deterministic).
  * `_sparse_logits_kernel` is the indexed dot at the K+1 ids of each row (target, concept set, soft
    ids) and reduces them to target_logit, set_lse (online log-sum-exp) and soft_dot.

Backward (`triton_shard_grads`), with dz_v = coef_dense exp(z_v - lse) - sparse terms:
  * dense part, deterministic (default, no atomics, bitwise-reproducible):
      - trainable head (weight_pass="chunked"): for each vocabulary chunk (<= _CHUNK_BYTES of gradient),
        `_dense_grad_kernel` (OWNER 3) recomputes the logit tiles once, adds the sparse terms at the
        target / concept ids to the float32 tile and writes the chunk's gradient dR_c [N, V_c] in the
        input dtype (one rounding); `_chunk_matmul_kernel` then does dH += dR_c W_c (float32 dH, summed
        over the chunks) and dW_c = dR_c^T H (float32 accumulators, stored in the weight's dtype: each
        dW_c is complete within its chunk), db_c = float32 column sums stored in the bias's dtype.
        6 N D V flops in all; no sparse kernels.
      - frozen head (need_weight=False): `_dense_grad_kernel` (OWNER 1) owns row tiles of dH and sweeps
        the vocabulary (in slices when N is small), parking GROUP gradient tiles in a per-program scratch
        slab and multiplying them out together; no [N, V_c] buffer. 4 N D V flops.
      - weight_pass="sweep": OWNER 1 for dH plus a persistent OWNER 2 sweep for dW/db (8 N D V flops).
    deterministic=False: OWNER 0, one launch over (row tile, vocab tile) pairs adding with float32
    atomics (6 N D V flops, not reproducible, heavy atomic traffic).
  * the sparse terms (target and concept ids) are formed from their recomputed logits as one signed
    coefficient per (row, id). Chunked pass: added inside the dR_c tiles (above). Other passes:
    `_sparse_grad_hidden_kernel` adds them into dH rows and `_sparse_grad_weight_kernel` into dW/db
    rows, the pairs sorted by id so no two programs touch one row.
  * filter_eps > 0 drops dense tiles whose every softmax probability is below filter_eps (off by default).

All accumulation is float32. d_hidden is returned in float32 (it sums partial products over vocabulary
chunks / slices); d_weight and d_bias come back in the weight's / bias's dtype from the chunked pass (no
float32 [V, D] buffer, and the caller's cast is a no-op) and in float32 from the sweep / atomic passes.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from fused_concept.kernels import configs
from fused_concept.kernels.chunk_matmul import _chunk_matmul_kernel
from fused_concept.kernels.dense_grad import _dense_grad_kernel
from fused_concept.kernels.dense_stats import _dense_stats_kernel
from fused_concept.kernels.sparse_grad_hidden import _sparse_grad_hidden_kernel
from fused_concept.kernels.sparse_grad_weight import _sparse_grad_weight_kernel
from fused_concept.kernels.sparse_logits import _sparse_logits_kernel

from ._inputs import Canonical
from ._rowmath import Needs, RowGrad, ShardGrads, ShardStats

# The keyword switches of `triton_shard_grads` that users pass as concept_loss(kernel_options=...).
KERNEL_OPTIONS = ("deterministic", "filter_eps", "weight_pass", "vocab_splits", "chunk_columns")

# Programs wanted in flight per streaming multiprocessor before a sweep splits the vocabulary.
_PROGRAMS_PER_SM = 2
# Most bytes of float32 d_hidden partials the deterministic backward may allocate to split the vocabulary.
_SPLIT_BYTES = 32 * 2 ** 20
# Most bytes of the per-chunk logit gradient [N, V_chunk] of the chunked backward.
_CHUNK_BYTES = 32 * 2 ** 20


def _check(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] must share D, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    configs.dtype_class(hidden.dtype)  # raises TypeError for unsupported dtypes
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def _softcap_arg(softcap: Optional[float]) -> float:
    if softcap is None:
        return 0.0
    if not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    return float(softcap)


def _id_table(targets: Tensor, set_ids: Tensor, soft_ids: Optional[Tensor]) -> Tensor:
    """[N, J] int64: column 0 the target, then the set ids, then the soft ids (global ids, -1 pads)."""
    parts = [targets.reshape(-1, 1).to(torch.int64), set_ids.to(torch.int64)]
    if soft_ids is not None:
        parts.append(soft_ids.to(torch.int64))
    return torch.cat(parts, dim=1).contiguous()


def _vocab_splits(n_rows: int, v: int, block_m: int, block_n: int, device: torch.device) -> int:
    if configs.interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles = triton.cdiv(n_rows, block_m)
    want = triton.cdiv(_PROGRAMS_PER_SM * sms, row_tiles)
    return max(1, min(want, triton.cdiv(v, block_n)))


def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent d_weight sweep: two per multiprocessor (2 under the interpreter)."""
    if configs.interpreting() or device.type != "cuda":
        return 2
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _sparse_logits(hidden, weight, bias, ids, soft_weights, n_set, *, vocab_start, softcap, reduce, store_z):
    n, d = hidden.shape
    v = weight.shape[0]
    j = ids.shape[1]
    dev = hidden.device
    target = torch.zeros(n, dtype=torch.float32, device=dev)
    set_lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    soft_dot = torch.zeros(n, dtype=torch.float32, device=dev)
    z = torch.zeros((n, j), dtype=torch.float32, device=dev) if store_z else target
    has_soft = soft_weights is not None
    sw = soft_weights.to(torch.float32).contiguous() if has_soft else target
    cfg = configs.choose("sparse_logits", hidden.dtype, hidden.device)
    if n > 0 and j > 0:
        grid = (triton.cdiv(n, cfg.blocks["BLOCK_R"]),)
        _sparse_logits_kernel[grid](
            hidden, weight, bias, ids, sw, z, target, set_lse, soft_dot,
            n, v, d, j, n_set, vocab_start, softcap,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            0 if bias is None else bias.stride(0),
            HAS_SOFT=has_soft, REDUCE=reduce, STORE_Z=store_z,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.blocks)
    return z, target, set_lse, soft_dot


def triton_partial_stats(canon: Canonical, *, vocab_splits: Optional[int] = None) -> ShardStats:
    """Statistics of this vocabulary shard (global ids vocab_start .. vocab_start + V - 1) per row.

    vocab_splits forces the number of vocabulary slices of the dense sweep (default: enough to keep
    every multiprocessor busy when N is small; 1 under the interpreter)."""
    hidden, weight, bias, targets, set_ids = canon.hidden, canon.weight, canon.bias, canon.targets, canon.set_ids
    soft_ids, soft_weights, vocab_start, softcap = canon.soft_ids, canon.soft_weights, canon.vocab_start, canon.softcap
    _check(hidden, weight, bias)
    cap = _softcap_arg(softcap)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    if v == 0:
        raise ValueError("weight has no rows (empty vocabulary shard)")
    cfg = configs.choose("dense_stats", hidden.dtype, hidden.device)
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    splits = vocab_splits if vocab_splits is not None else _vocab_splits(n, v, bm, bn, dev)
    chunk = triton.cdiv(triton.cdiv(v, max(1, int(splits))), bn) * bn
    splits = triton.cdiv(v, chunk)
    part_max = torch.empty((splits, n), dtype=torch.float32, device=dev)
    part_sum = torch.empty((splits, n), dtype=torch.float32, device=dev)
    part_arg = torch.empty((splits, n), dtype=torch.int64, device=dev)
    if n > 0:
        _dense_stats_kernel[(triton.cdiv(n, bm), splits)](
            hidden, weight, bias, part_max, part_sum, part_arg,
            n, v, d, chunk, vocab_start, cap,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            0 if bias is None else bias.stride(0),
            UPCAST=configs.interpreting(), DOT_PRECISION=configs.dot_precision(hidden.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.blocks)
    if splits == 1:
        row_max, argmax = part_max[0], part_arg[0]
        lse = row_max + torch.log(part_sum[0])
    else:
        row_max = part_max.max(dim=0).values
        safe = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        lse = safe + torch.log((part_sum * torch.exp(part_max - safe)).sum(dim=0))
        first = (part_max == row_max).to(torch.int32).argmax(dim=0)  # lowest slice = lowest id
        argmax = part_arg.gather(0, first[None]).squeeze(0)

    ids = _id_table(targets, set_ids, soft_ids)
    _, target_logit, set_lse, soft_dot = _sparse_logits(
        hidden, weight, bias, ids, soft_weights, set_ids.shape[1], vocab_start=vocab_start, softcap=cap,
        reduce=True, store_z=False)
    return ShardStats(max=row_max, argmax=argmax, lse=lse, target_logit=target_logit, set_lse=set_lse,
                      soft_dot=soft_dot)


def _signed_sparse_coefs(z, ids, *, n_set, soft_weights, vocab_start, v, softcap, set_lse, coef_target,
                         coef_set):
    """s [N, J]: what each (row, id) adds to dz at that id: -coef_target at the target, -coef_set * q
    at the concept ids, times the softcap derivative; 0 for ids outside this shard."""
    hit = (ids >= vocab_start) & (ids < vocab_start + v)
    s = torch.zeros_like(z)
    s[:, 0] = -coef_target.to(torch.float32)
    if soft_weights is None:
        finite = torch.isfinite(set_lse)[:, None]
        q = torch.exp(z[:, 1:1 + n_set] - torch.where(finite, set_lse[:, None], torch.zeros_like(z[:, :1])))
        s[:, 1:1 + n_set] = torch.where(finite, -coef_set.to(torch.float32)[:, None] * q, torch.zeros_like(q))
    else:
        s[:, 1 + n_set:] = -coef_set.to(torch.float32)[:, None] * soft_weights.to(torch.float32)
    if softcap > 0:
        s = s * (1.0 - (z / softcap) ** 2)
    return torch.where(hit, s, torch.zeros_like(s))


def _matmul(a: Tensor, b: Tensor, c: Tensor, *, accumulate: bool) -> None:
    """c = [c +] a @ b with `_chunk_matmul_kernel` (float32 accumulator, cast to c's dtype at the store;
    c is float32 when accumulate); a, b any-strided views in the input dtype."""
    m, k = a.shape
    n = b.shape[1]
    cfg = configs.choose("chunk_matmul", a.dtype, a.device)
    grid = (triton.cdiv(m, cfg.blocks["BLOCK_M"]) * triton.cdiv(n, cfg.blocks["BLOCK_N"]),)
    _chunk_matmul_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                               c.stride(0), c.stride(1), ACCUMULATE=accumulate, UPCAST=configs.interpreting(),
                               DOT_PRECISION=configs.dot_precision(a.dtype), num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages, **cfg.blocks)


def _chunked_grads(hidden, weight, bias, lse, coef_dense, loc, s, d_hidden, d_weight, d_bias, cap, filter_eps,
                   chunk_columns):
    """dH / dW / db, one vocabulary chunk at a time: the chunk's logit gradient dR_c = coef * softmax
    (x softcap derivative) + the sparse terms s at the shard-local ids loc, formed in float32 and written
    once ([N, V_c], input dtype), then dH += dR_c @ W_c (float32 dH, accumulated over the chunks),
    dW_c = dR_c^T @ H (float32 accumulators, stored in d_weight's dtype: complete within its chunk),
    db_c = float32 column sums of dR_c stored in d_bias's dtype. Deterministic, no atomics."""
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    cfg = configs.choose("dense_grad_chunk", hidden.dtype, dev)
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    grad_dtype = torch.float32 if configs.interpreting() else hidden.dtype
    if chunk_columns is None:
        if configs.interpreting():
            chunk_columns = 2 * bn
        else:
            per_row = max(1, n) * torch.finfo(grad_dtype).bits // 8
            chunk_columns = max(bn, _CHUNK_BYTES // per_row // bn * bn)
    width = min(triton.cdiv(int(chunk_columns), bn) * bn, triton.cdiv(v, bn) * bn)
    grad = torch.empty((n, width), dtype=grad_dtype, device=dev)
    for c0 in range(0, v, width):
        c1 = min(v, c0 + width)
        w_c = weight[c0:c1]
        b_c = None if bias is None else bias[c0:c1]
        _dense_grad_kernel[(triton.cdiv(n, bm), triton.cdiv(c1 - c0, bn))](
            hidden, w_c, b_c, lse, coef_dense, lse, lse, lse, grad,
            n, c1 - c0, d, width, cap, float(filter_eps), loc, s, loc.shape[1], c0,
            hidden.stride(0), hidden.stride(1), w_c.stride(0), w_c.stride(1),
            0 if b_c is None else b_c.stride(0),
            OWNER=3, DO_DH=False, DO_DW=False, DO_DB=False, UPCAST=configs.interpreting(),
            DOT_PRECISION=configs.dot_precision(hidden.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **cfg.blocks)
        g_c = grad[:, :c1 - c0]
        if d_hidden is not None:
            _matmul(g_c, w_c.to(grad_dtype) if grad_dtype != w_c.dtype else w_c, d_hidden, accumulate=True)
        _matmul(g_c.t(), hidden.to(grad_dtype) if grad_dtype != hidden.dtype else hidden, d_weight[c0:c1],
                accumulate=False)
        if d_bias is not None:
            d_bias[c0:c1] = g_c.float().sum(dim=0)


def triton_shard_grads(canon: Canonical, grad: RowGrad, needs: Needs, *, deterministic: bool = True,
                       filter_eps: float = 0.0, vocab_splits: Optional[int] = None, weight_pass: str = "chunked",
                       chunk_columns: Optional[int] = None) -> ShardGrads:
    """(d_hidden [N, D], d_weight [V, D], d_bias [V]) for this shard; None where not needed.

    d_hidden is float32. d_weight / d_bias are in the weight's / bias's dtype on the chunked pass (the
    default for a trainable head) and float32 on weight_pass="sweep" and deterministic=False.

    lse / set_lse are the merged (global) statistics, coef_* the per-row scalars of _rowmath.
    deterministic=False adds dense tiles with atomics (one logit recompute instead of two when dW is
    needed; not bitwise reproducible). filter_eps > 0 skips dense tiles whose every softmax probability is below filter_eps.
    vocab_splits: slices of the vocabulary for the deterministic d_hidden sweep when N is small (default:
    enough to fill the GPU within _SPLIT_BYTES of float32 partials; 1 under the interpreter).
    weight_pass (deterministic, d_weight needed): "chunked" (default) recomputes the logits once per
    vocabulary chunk of chunk_columns ids (default: _CHUNK_BYTES of gradient in the input dtype), writes
    the chunk's logit gradient and multiplies it out for dH and dW (6 N D V flops); "sweep" runs the
    d_hidden sweep and a d_weight sweep, each recomputing the logits (8 N D V flops, no [N, chunk] buffer)."""
    hidden, weight, bias, targets, set_ids = canon.hidden, canon.weight, canon.bias, canon.targets, canon.set_ids
    soft_ids, soft_weights, vocab_start, softcap = canon.soft_ids, canon.soft_weights, canon.vocab_start, canon.softcap
    lse, set_lse = grad.lse, grad.set_lse
    coef_dense, coef_target, coef_set = grad.coef_dense, grad.coef_target, grad.coef_set
    need_hidden, need_weight = needs.hidden, needs.weight
    _check(hidden, weight, bias)
    cap = _softcap_arg(softcap)
    need_bias = bool(needs.bias and bias is not None)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    if weight_pass not in ("chunked", "sweep"):
        raise ValueError(f'weight_pass must be "chunked" or "sweep", got {weight_pass!r}')
    # chunked: every dW / db row is complete within its chunk, so it is stored in the input dtype (float32
    # accumulators, one rounding at the store); the other passes accumulate into float32 buffers
    chunked = deterministic and need_weight and weight_pass == "chunked"
    f32 = dict(dtype=torch.float32, device=dev)
    alloc = torch.empty if chunked and n > 0 else torch.zeros  # chunked: every row is written
    d_hidden = torch.zeros((n, d), **f32) if need_hidden else None  # sums over chunks: float32
    d_weight = alloc((v, d), dtype=weight.dtype if chunked else torch.float32, device=dev) if need_weight else None
    d_bias = alloc((v,), dtype=bias.dtype if chunked else torch.float32, device=dev) if need_bias else None
    if n == 0 or not (need_hidden or need_weight or need_bias):
        return ShardGrads(d_hidden, d_weight, d_bias)
    if filter_eps < 0:
        raise ValueError(f"filter_eps must be >= 0, got {filter_eps}")

    lse = lse.to(torch.float32).contiguous()
    coef_dense = coef_dense.to(torch.float32).contiguous()
    dummy = lse
    slab_dtype = torch.float32 if configs.interpreting() else hidden.dtype

    def launch(cfg_name, grid, owner, do_dh, do_dw, do_db, dh_buf=None, chunk=v):
        cfg = configs.choose(cfg_name, hidden.dtype, hidden.device)
        b = cfg.blocks
        programs = grid[0] * grid[1] if owner != 0 else 0
        slab = b["BLOCK_M"] * b["BLOCK_N"] * b["GROUP"]  # scratch elements per program (OWNER 1 and 2)
        scratch = torch.empty(programs * slab, dtype=slab_dtype, device=dev) if programs else dummy
        _dense_grad_kernel[grid](
            hidden, weight, bias, lse, coef_dense,
            dh_buf if do_dh else dummy, d_weight if do_dw else dummy, d_bias if do_db else dummy, scratch,
            n, v, d, chunk, cap, float(filter_eps), dummy, dummy, 0, 0,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            0 if bias is None else bias.stride(0),
            OWNER=owner, DO_DH=do_dh, DO_DW=do_dw, DO_DB=do_db, UPCAST=configs.interpreting(),
            DOT_PRECISION=configs.dot_precision(hidden.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **b)

    def tiles(cfg_name):
        b = configs.choose(cfg_name, hidden.dtype, hidden.device).blocks
        return b["BLOCK_M"], b["BLOCK_N"]

    # sparse terms at the target / concept ids: one signed coefficient per (row, id)
    ids = _id_table(targets, set_ids, soft_ids)
    n_set = set_ids.shape[1]
    z, _, _, _ = _sparse_logits(hidden, weight, bias, ids, None, n_set, vocab_start=vocab_start, softcap=cap,
                                reduce=False, store_z=True)
    s = _signed_sparse_coefs(z, ids, n_set=n_set, soft_weights=soft_weights, vocab_start=vocab_start, v=v,
                             softcap=cap, set_lse=set_lse.to(torch.float32), coef_target=coef_target,
                             coef_set=coef_set).contiguous()
    if chunked:
        # the sparse terms go into each chunk's float32 logit-gradient tiles (before their one rounding)
        # and reach dH / dW / db through the chunk products: no sparse kernels, no read-modify-write of
        # input-dtype dW rows
        hit = (ids >= vocab_start) & (ids < vocab_start + v)
        loc = torch.where(hit, ids - vocab_start, torch.full_like(ids, -1)).to(torch.int32).contiguous()
        _chunked_grads(hidden, weight, bias, lse, coef_dense, loc, s, d_hidden, d_weight, d_bias, cap,
                       filter_eps, chunk_columns)
        return ShardGrads(d_hidden, d_weight, d_bias)
    if deterministic:
        if need_hidden:
            bm, bn = tiles("dense_grad_h")
            splits = vocab_splits
            if splits is None:
                splits = _vocab_splits(n, v, bm, bn, dev)
                splits = max(1, min(splits, _SPLIT_BYTES // max(1, 4 * n * d)))
            chunk = triton.cdiv(triton.cdiv(v, max(1, int(splits))), bn) * bn
            splits = triton.cdiv(v, chunk)
            if splits == 1:
                launch("dense_grad_h", (triton.cdiv(n, bm), 1), 1, True, False, False, d_hidden, chunk)
            else:
                parts = torch.zeros((splits, n, d), **f32)
                launch("dense_grad_h", (triton.cdiv(n, bm), splits), 1, True, False, False, parts, chunk)
                for part in parts:  # fixed order: deterministic
                    d_hidden += part
        if need_weight or need_bias:
            _, bn = tiles("dense_grad_w")
            launch("dense_grad_w", (min(triton.cdiv(v, bn), _persistent_programs(dev)), 1), 2, False,
                   need_weight, need_bias)
    else:
        bm, bn = tiles("dense_grad_atomic")
        launch("dense_grad_atomic", (triton.cdiv(n, bm), triton.cdiv(v, bn)), 0, need_hidden, need_weight,
               need_bias, d_hidden)

    # sparse terms of the sweep / atomic passes: added into the float32 dH / dW / db rows
    j = ids.shape[1]
    if need_hidden:
        c = configs.choose("sparse_grad_hidden", hidden.dtype, hidden.device)
        grid = (triton.cdiv(n, c.blocks["BLOCK_R"]), triton.cdiv(d, c.blocks["BLOCK_K"]))
        _sparse_grad_hidden_kernel[grid](
            weight, ids, s, d_hidden, n, v, d, j, vocab_start, weight.stride(0), weight.stride(1),
            num_warps=c.num_warps, num_stages=c.num_stages, **c.blocks)
    if need_weight or need_bias:
        keep = (s != 0).reshape(-1)
        flat_local = (ids - vocab_start).reshape(-1)[keep]
        if flat_local.numel() > 0:
            flat_row = torch.arange(n, device=dev).repeat_interleave(j)[keep]
            flat_s = s.reshape(-1)[keep]
            order = torch.sort(flat_local, stable=True).indices
            sorted_ids = flat_local[order]
            seg_id, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
            seg_start = torch.zeros(seg_id.numel() + 1, dtype=torch.int64, device=dev)
            seg_start[1:] = torch.cumsum(counts, 0)
            c = configs.choose("sparse_grad_weight", hidden.dtype, hidden.device)
            u = seg_id.numel()
            grid = (triton.cdiv(u, c.blocks["BLOCK_U"]), triton.cdiv(d, c.blocks["BLOCK_K"]) if need_weight else 1)
            _sparse_grad_weight_kernel[grid](
                hidden, seg_start, seg_id.contiguous(), flat_row[order].contiguous(), flat_s[order].contiguous(),
                d_weight if need_weight else dummy, d_bias if need_bias else dummy,
                u, d, hidden.stride(0), hidden.stride(1),
                DO_DW=need_weight, DO_DB=need_bias, num_warps=c.num_warps, num_stages=c.num_stages, **c.blocks)
    return ShardGrads(d_hidden, d_weight, d_bias)
