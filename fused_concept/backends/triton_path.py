"""The Triton path: steps 1 and 3 of docs/internals.md on fused kernels; [N, V] logits never exist.

Forward (`triton_partial_stats`):
  * `_dense_stats_kernel` sweeps the vocabulary in `tl.dot` tiles of h W^T (+ b, softcap) and keeps an
    online max / arg-max / sum of exp per row. When there are too few row tiles to fill the GPU the
    vocabulary is split into slices, one program per (row tile, slice); each writes its own slot of a
    [slices, N] buffer and the slices are merged here, in id order (no atomics, deterministic).
  * `_sparse_logits_kernel` is the indexed dot at the K+1 ids of each row (target, concept set, soft
    ids) and reduces them to target_logit, set_lse (online log-sum-exp) and soft_dot.

Backward (`triton_shard_grads`), with dz_v = coef_dense exp(z_v - lse) - sparse terms, picks a strategy
(kernel_options strategy=, see STRATEGIES), one function each (the owner modes of `_dense_grad_kernel` are
named in kernels/dense_grad.py):
  * strategy "rows" (triton_rows.py): row chunks of cuBLAS logits and one `_chunk_rows_kernel` per chunk;
    with reduction "mean" / "sum" the gradient is formed in the forward (`triton_stats_and_grads`, 6 N D V
    in all), otherwise the backward recomputes each chunk's logits.
  * `_chunked_grads` (strategy "recompute", the default, trainable or frozen head): per vocabulary chunk
    (<= _CHUNK_BYTES of gradient) OWNER_CHUNK recomputes the logit tiles once, adds the sparse terms to the
    float32 tile and writes the chunk's gradient dR_c [N, V_c] in the input dtype (one rounding); then dH += dR_c W_c
    (float32 dH) and, for a trainable head, dW_c = dR_c^T H (stored in the weight's dtype), db_c = column
    sums. The products run on cuBLAS for 16-bit inputs on a GPU (`_product`), else on
    `_chunk_matmul_kernel`; with a tile filter the keep map of each chunk becomes two lists of kept tiles
    (`_tile_lists_kernel`) and `_chunk_matmul_kernel` skips the dropped tiles.
    2 N D V (recompute) + 2 N D V (dH) [+ 2 N D V (dW)] x kept fraction flops.
  * `_hidden_sweep` (strategy "recompute_sweep"): OWNER_ROWS owns row tiles of dH and sweeps the vocabulary
    (in slices when N is small), parking GROUP gradient tiles in a scratch slab and multiplying them out
    together. On the H200 it ran a frozen head's backward 2x slower than the chunked strategy did.
  * `_weight_sweep` (strategy "recompute_sweep", trainable head): plus a persistent OWNER_COLUMNS sweep for
    dW / db (8 N D V flops in all, no [N, chunk] buffer).
  * `_atomic_grads` (strategy "recompute", deterministic=False): OWNER_ATOMIC, one launch over (row tile,
    vocab tile) pairs adding with float32 atomics (6 N D V flops, not reproducible).
  The sweep and atomic strategies add the sparse terms afterwards (`_add_sparse_terms`: the
  `_sparse_grad_hidden_kernel` / `_sparse_grad_weight_kernel` pair, pairs sorted by id, no atomics).

filter_eps (a number > 0; "auto", the default, is off: see AUTO_FILTER_EPS for the measurements) drops
dense tiles whose every softmax probability is below it (not with label smoothing, which puts gradient on
every logit). All accumulation is float32. d_hidden is returned in float32; d_weight / d_bias in the
weight's / bias's dtype from the chunked strategy and in float32 from the others.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor

from fused_concept.kernels import configs
from fused_concept.kernels.chunk_matmul import _chunk_matmul_kernel
from fused_concept.kernels.dense_grad import OWNER_ATOMIC, OWNER_CHUNK, OWNER_COLUMNS, OWNER_ROWS, _dense_grad_kernel
from fused_concept.kernels.dense_stats import _dense_stats_kernel
from fused_concept.kernels.sparse_grad_hidden import _sparse_grad_hidden_kernel
from fused_concept.kernels.sparse_grad_weight import _sparse_grad_weight_kernel
from fused_concept.kernels.sparse_logits import _sparse_logits_kernel
from fused_concept.kernels.tile_lists import _tile_lists_kernel

from fused_concept.core.inputs import Canonical
from fused_concept.core.rowmath import Needs, RowGrad, ShardGrads, ShardStats
from fused_concept.backends.products import mm_into, wide_products

# The keyword switches of `triton_shard_grads` that users pass as concept_loss(kernel_options=...).
KERNEL_OPTIONS = ("strategy", "deterministic", "filter_eps", "vocab_splits", "chunk_columns", "chunk_rows",
                  "chunk_mib", "weight_accum")
# kernel_options strategy=: "recompute" (the default: the forward keeps row statistics, the backward
# recomputes the logits in vocabulary chunks; least memory), "recompute_sweep" (the same without a chunk
# buffer, persistent sweeps), "rows" (row chunks of cuBLAS logits, the gradient formed in the forward:
# triton_rows.py)
STRATEGIES = ("recompute", "recompute_sweep", "rows")
DEFAULT_STRATEGY = "recompute"
_RECOMPUTE_ONLY = ("vocab_splits", "chunk_columns")
_RENAMED = {"weight_pass": 'kernel_options weight_pass was renamed: weight_pass="chunked" is now '
                           'strategy="recompute" (the default) and weight_pass="sweep" strategy="recompute_sweep"'}

# Programs wanted in flight per streaming multiprocessor before a sweep splits the vocabulary.
_PROGRAMS_PER_SM = 2
# Most bytes of float32 d_hidden partials the deterministic backward may allocate to split the vocabulary.
_SPLIT_BYTES = 32 * 2 ** 20
# Most bytes of the per-chunk logit gradient [N, V_chunk] of the chunked backward.
_CHUNK_BYTES = 32 * 2 ** 20
# filter_eps="auto": off. At 2**-12 (cut-cross-entropy's bf16 threshold) benchmarks/filter_study.py found
# the added error below the bf16 rounding but only 4.7% of tiles droppable on SmolLM2's activations, and on
# the H200 the filtered backward (skip lists, Triton's products) ran 1.41x slower than the unfiltered one
# (cuBLAS products): benchmarks/results/2026-11-29-h200-2, Llama-3-8B, K=0.
AUTO_FILTER_EPS = 0.0


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
    smoothing = bool(canon.label_smoothing)
    cfg = configs.choose("dense_stats_smoothing" if smoothing else "dense_stats", hidden.dtype, hidden.device)
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    splits = vocab_splits if vocab_splits is not None else _vocab_splits(n, v, bm, bn, dev)
    chunk = triton.cdiv(triton.cdiv(v, max(1, int(splits))), bn) * bn
    splits = triton.cdiv(v, chunk)
    part_max = torch.empty((splits, n), dtype=torch.float32, device=dev)
    part_sum = torch.empty((splits, n), dtype=torch.float32, device=dev)
    part_arg = torch.empty((splits, n), dtype=torch.int64, device=dev)
    part_zsum = torch.empty((splits, n), dtype=torch.float32, device=dev) if smoothing else None
    if n > 0:
        _dense_stats_kernel[(triton.cdiv(n, bm), splits)](
            hidden, weight, bias, part_max, part_sum, part_arg, part_zsum,
            n, v, d, chunk, vocab_start, cap,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            0 if bias is None else bias.stride(0),
            UPCAST=configs.interpreting(), DOT_PRECISION=configs.DOT_PRECISION,
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
    logit_sum = None if part_zsum is None else part_zsum.sum(dim=0)  # slices in order: deterministic
    return ShardStats(max=row_max, argmax=argmax, lse=lse, target_logit=target_logit, set_lse=set_lse,
                      soft_dot=soft_dot, logit_sum=logit_sum)


# ------------------------------------------------------------------------------------------------ backward
class _Backward(NamedTuple):
    """What every backward strategy reads: the head and rows (from Canonical), the merged statistics, the
    sparse terms as one signed coefficient per (row, id), and the resolved switches."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    lse: Tensor  # [N] float32, global
    coef_dense: Tensor  # [N] float32
    coef_uniform: Optional[Tensor]  # [N] float32 (label smoothing: subtracted at every id), or None
    ids: Tensor  # [N, J] int64 global ids: target, concept set, soft ids (-1 pads)
    sparse: Tensor  # [N, J] float32: what each (row, id) adds to dz at that id; 0 outside this shard
    vocab_start: int
    softcap: float  # 0.0 = none
    filter_eps: float  # 0.0 = off

    @property
    def scratch_dtype(self) -> torch.dtype:
        """dtype of gradient tiles parked in memory: the input dtype (float32 under the interpreter)."""
        return torch.float32 if configs.interpreting() else self.hidden.dtype


def filter_threshold(filter_eps, dtype: torch.dtype) -> float:
    """The tile filter's threshold for inputs of `dtype`: "auto" is AUTO_FILTER_EPS (off, for every dtype);
    a number >= 0 is used as given (0 = off)."""
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f'filter_eps must be "auto" or a number >= 0, got {filter_eps!r}')
        return AUTO_FILTER_EPS
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)) or not filter_eps >= 0:
        raise ValueError(f'filter_eps must be "auto" or a number >= 0, got {filter_eps!r}')
    return float(filter_eps)


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


def _backward_inputs(canon: Canonical, grad: RowGrad, filter_eps: float) -> _Backward:
    """The sparse coefficients from the recomputed logits at each row's ids, and the rest of _Backward."""
    cap = _softcap_arg(canon.softcap)
    ids = _id_table(canon.targets, canon.set_ids, canon.soft_ids)
    n_set = canon.set_ids.shape[1]
    z, _, _, _ = _sparse_logits(canon.hidden, canon.weight, canon.bias, ids, None, n_set,
                                vocab_start=canon.vocab_start, softcap=cap, reduce=False, store_z=True)
    sparse = _signed_sparse_coefs(z, ids, n_set=n_set, soft_weights=canon.soft_weights, vocab_start=canon.vocab_start,
                                  v=canon.weight.shape[0], softcap=cap, set_lse=grad.set_lse.to(torch.float32),
                                  coef_target=grad.coef_target, coef_set=grad.coef_set).contiguous()
    uniform = None if grad.coef_uniform is None else grad.coef_uniform.to(torch.float32).contiguous()
    return _Backward(canon.hidden, canon.weight, canon.bias, grad.lse.to(torch.float32).contiguous(),
                     grad.coef_dense.to(torch.float32).contiguous(), uniform, ids, sparse, canon.vocab_start, cap,
                     filter_eps)


def _dense_grad(b: _Backward, cfg: configs.LaunchConfig, grid, *, owner, weight: Tensor, bias: Optional[Tensor],
                chunk: int, scratch: Optional[Tensor] = None, d_hidden: Optional[Tensor] = None,
                d_weight: Optional[Tensor] = None, d_bias: Optional[Tensor] = None, keep: Optional[Tensor] = None,
                loc: Optional[Tensor] = None, sparse: Optional[Tensor] = None, id_base: int = 0) -> None:
    """One launch of `_dense_grad_kernel` in owner mode `owner` (a dense_grad.OWNER_* constant, passed on
    as the plain int it holds, like every other constexpr argument) over
    `weight` / `bias` (the shard, or one vocabulary chunk of it). The outputs given are the ones written;
    keep (the tile map) only with OWNER_CHUNK and a filter; loc / sparse only with OWNER_CHUNK."""
    hidden = b.hidden
    _dense_grad_kernel[grid](
        h_ptr=hidden, w_ptr=weight, b_ptr=bias, lse_ptr=b.lse, coef_ptr=b.coef_dense, uni_ptr=b.coef_uniform,
        dh_ptr=d_hidden,
        dw_ptr=d_weight, db_ptr=d_bias, scratch_ptr=scratch, keep_ptr=keep, loc_ptr=loc, sp_ptr=sparse,
        J=0 if loc is None else loc.shape[1], id_base=id_base, N=hidden.shape[0], V=weight.shape[0],
        D=hidden.shape[1], chunk=chunk, softcap=b.softcap, filter_eps=b.filter_eps,
        stride_hn=hidden.stride(0), stride_hd=hidden.stride(1), stride_wv=weight.stride(0),
        stride_wd=weight.stride(1), stride_b=0 if bias is None else bias.stride(0),
        OWNER=int(owner), DO_DH=d_hidden is not None, DO_DW=d_weight is not None, DO_DB=d_bias is not None,
        UPCAST=configs.interpreting(), DOT_PRECISION=configs.DOT_PRECISION,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.blocks)


class _SkipLists(NamedTuple):
    """Which LIST_K-wide column tiles of A's LIST_ROWS-row bands a product sums (tile_lists.py)."""

    tiles: Tensor  # [bands, max tiles] int32, ascending, valid up to count
    count: Tensor  # [bands] int32
    list_rows: int
    list_k: int


def _matmul(a: Tensor, b: Tensor, c: Tensor, *, accumulate: bool, skip: Optional[_SkipLists] = None) -> None:
    """c = [c +] a @ b with `_chunk_matmul_kernel` (float32 accumulator, cast to c's dtype at the store;
    c is float32 when accumulate); a, b any-strided views in the input dtype. With `skip`, only the
    listed column tiles of each band of a's rows are summed (the others are zero in a)."""
    m, k = a.shape
    n = b.shape[1]
    cfg = configs.choose("chunk_matmul", a.dtype, a.device)
    bm, bk = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_K"]
    if skip is not None and (skip.list_rows % bm or skip.list_k % bk):
        raise RuntimeError(f"chunk_matmul blocks ({bm} x {bk}) must divide the skip tiles "
                           f"({skip.list_rows} x {skip.list_k}); see kernels/configs.py")
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, cfg.blocks["BLOCK_N"]),)
    _chunk_matmul_kernel[grid](
        a_ptr=a, b_ptr=b, c_ptr=c, list_ptr=None if skip is None else skip.tiles,
        count_ptr=None if skip is None else skip.count, M=m, N=n, K=k,
        list_stride=0 if skip is None else skip.tiles.stride(0), stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_bk=b.stride(0), stride_bn=b.stride(1), stride_cm=c.stride(0), stride_cn=c.stride(1),
        LIST_ROWS=1 if skip is None else skip.list_rows, LIST_K=1 if skip is None else skip.list_k,
        ACCUMULATE=accumulate, UPCAST=configs.interpreting(), DOT_PRECISION=configs.DOT_PRECISION,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.blocks)



def _product(a: Tensor, b: Tensor, c: Tensor, *, accumulate: bool, skip: Optional[_SkipLists] = None) -> None:
    """c = [c +] a @ b, as `_matmul`: on cuBLAS where it computes the same thing (16-bit operands on a GPU,
    no tiles to skip: float32 accumulation, one rounding to c's dtype), else on `_chunk_matmul_kernel`.
    On the H200, cuBLAS ran these products faster (benchmarks/results/2026-11-29-h200)."""
    if skip is None and not configs.interpreting() and wide_products(a):
        mm_into(a, b, c, accumulate=accumulate)
    else:
        _matmul(a, b, c, accumulate=accumulate, skip=skip)


def _skip_lists(keep: Tensor, bm: int, bn: int) -> Tuple[_SkipLists, _SkipLists]:
    """(for dR_c @ W_c, for dR_c^T @ H): the kept tiles of the chunk's [R, C] keep map by row and by column."""
    r, c = keep.shape
    dev = keep.device
    by_row = torch.empty((r, c), dtype=torch.int32, device=dev)
    by_col = torch.empty((c, r), dtype=torch.int32, device=dev)
    count_row = torch.empty(r, dtype=torch.int32, device=dev)
    count_col = torch.empty(c, dtype=torch.int32, device=dev)
    cfg = configs.choose("tile_lists", torch.float32, dev)
    _tile_lists_kernel[(r + c,)](keep_ptr=keep, by_row_ptr=by_row, count_row_ptr=count_row, by_col_ptr=by_col,
                                 count_col_ptr=count_col, R=r, C=c, MAX=triton.next_power_of_2(max(r, c)),
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _count_tiles(r * c, count_row)
    return _SkipLists(by_row, count_row, bm, bn), _SkipLists(by_col, count_col, bn, bm)


def _chunk_width(n: int, v: int, bn: int, grad_dtype: torch.dtype, chunk_columns: Optional[int]) -> int:
    """Columns per vocabulary chunk: chunk_columns, or _CHUNK_BYTES of gradient; a multiple of bn."""
    if chunk_columns is None:
        if configs.interpreting():
            chunk_columns = 2 * bn
        else:
            per_row = max(1, n) * torch.finfo(grad_dtype).bits // 8
            chunk_columns = max(bn, _CHUNK_BYTES // per_row // bn * bn)
    return min(triton.cdiv(int(chunk_columns), bn) * bn, triton.cdiv(v, bn) * bn)


def _chunked_grads(b: _Backward, needs: Needs, chunk_columns: Optional[int]) -> ShardGrads:
    """Strategy "chunked" (deterministic, trainable head): per vocabulary chunk, the chunk's logit gradient
    dR_c (dense part + sparse terms, formed in float32, written once in the input dtype), then
    dH += dR_c @ W_c (float32 dH, summed over the chunks), dW_c = dR_c^T @ H (float32 accumulators,
    stored in the weight's dtype: complete within its chunk), db_c = float32 column sums stored in the
    bias's dtype. With a filter, the tiles the keep map drops are skipped in both products."""
    hidden, weight, bias = b.hidden, b.weight, b.bias
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    cfg = configs.choose("dense_grad_chunk", hidden.dtype, dev)
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    d_hidden = torch.zeros((n, d), dtype=torch.float32, device=dev) if needs.hidden else None
    d_weight = torch.empty((v, d), dtype=weight.dtype, device=dev) if needs.weight else None  # all rows written
    d_bias = torch.empty((v,), dtype=bias.dtype, device=dev) if needs.bias and bias is not None else None
    hit = (b.ids >= b.vocab_start) & (b.ids < b.vocab_start + v)
    loc = torch.where(hit, b.ids - b.vocab_start, torch.full_like(b.ids, -1)).to(torch.int32).contiguous()
    grad_dtype = b.scratch_dtype
    width = _chunk_width(n, v, bn, grad_dtype, chunk_columns)
    grad = torch.empty((n, width), dtype=grad_dtype, device=dev)
    keep = torch.empty(triton.cdiv(n, bm) * triton.cdiv(width, bn), dtype=torch.int8, device=dev)
    h_op = hidden.to(grad_dtype)  # a no-op except under the interpreter
    for c0 in range(0, v, width):
        c1 = min(v, c0 + width)
        w_c = weight[c0:c1]
        b_c = None if bias is None else bias[c0:c1]
        tiles = (triton.cdiv(n, bm), triton.cdiv(c1 - c0, bn))
        keep_c = keep[:tiles[0] * tiles[1]].view(tiles) if b.filter_eps > 0 else None
        _dense_grad(b, cfg, tiles, owner=OWNER_CHUNK, weight=w_c, bias=b_c, chunk=width, scratch=grad, keep=keep_c,
                    loc=loc, sparse=b.sparse, id_base=c0)
        by_row, by_col = _skip_lists(keep_c, bm, bn) if keep_c is not None else (None, None)
        if keep_c is None:
            _count_tiles(tiles[0] * tiles[1], None)
        g_c = grad[:, :c1 - c0]
        if d_hidden is not None:
            _product(g_c, w_c.to(grad_dtype), d_hidden, accumulate=True, skip=by_row)
        if d_weight is not None:
            _product(g_c.t(), h_op, d_weight[c0:c1], accumulate=False, skip=by_col)
        if d_bias is not None:
            d_bias[c0:c1] = g_c.float().sum(dim=0)
    return ShardGrads(d_hidden, d_weight, d_bias)


def _hidden_sweep(b: _Backward, vocab_splits: Optional[int]) -> Tensor:
    """Strategy "frozen-head sweep" (deterministic; also the d_hidden half of strategy "recompute_sweep"): row
    tiles of dH own their rows and sweep the vocabulary (OWNER_ROWS), in slices when N is small; the
    slices' float32 partials are summed in a fixed order. Dense part only (sparse terms: _add_sparse_terms)."""
    n, d = b.hidden.shape
    v = b.weight.shape[0]
    dev = b.hidden.device
    cfg = configs.choose("dense_grad_h", b.hidden.dtype, dev)
    bm, bn, group = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], cfg.blocks["GROUP"]
    splits = vocab_splits
    if splits is None:
        splits = _vocab_splits(n, v, bm, bn, dev)
        splits = max(1, min(splits, _SPLIT_BYTES // max(1, 4 * n * d)))
    chunk = triton.cdiv(triton.cdiv(v, max(1, int(splits))), bn) * bn
    splits = triton.cdiv(v, chunk)
    grid = (triton.cdiv(n, bm), splits)
    parts = torch.zeros((splits, n, d), dtype=torch.float32, device=dev)
    scratch = torch.empty(grid[0] * grid[1] * bm * bn * group, dtype=b.scratch_dtype, device=dev)
    _dense_grad(b, cfg, grid, owner=OWNER_ROWS, weight=b.weight, bias=b.bias, chunk=chunk, scratch=scratch,
                d_hidden=parts)
    if splits == 1:
        return parts[0]
    d_hidden = parts[0].clone()  # not a view: the caller keeps d_hidden, not the [splits, N, D] buffer
    for part in parts[1:]:  # fixed order: deterministic
        d_hidden += part
    return d_hidden


def _weight_sweep(b: _Backward, needs: Needs) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Strategy "weight sweep" (strategy "recompute_sweep", or a trainable bias on a frozen weight): persistent
    programs own vocabulary tiles of dW / db and sweep all rows (OWNER_COLUMNS); float32 outputs, no
    [N, chunk] buffer, a second logit recompute. Dense part only (sparse terms: _add_sparse_terms)."""
    n, d = b.hidden.shape
    v = b.weight.shape[0]
    dev = b.hidden.device
    need_bias = needs.bias and b.bias is not None
    d_weight = torch.zeros((v, d), dtype=torch.float32, device=dev) if needs.weight else None
    d_bias = torch.zeros((v,), dtype=torch.float32, device=dev) if need_bias else None
    if d_weight is None and d_bias is None:
        return None, None
    cfg = configs.choose("dense_grad_w", b.hidden.dtype, dev)
    bm, bn, group = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], cfg.blocks["GROUP"]
    programs = min(triton.cdiv(v, bn), _persistent_programs(dev))
    scratch = torch.empty(programs * bm * bn * group, dtype=b.scratch_dtype, device=dev)
    _dense_grad(b, cfg, (programs,), owner=OWNER_COLUMNS, weight=b.weight, bias=b.bias, chunk=v, scratch=scratch,
                d_weight=d_weight, d_bias=d_bias)
    return d_weight, d_bias


def _atomic_grads(b: _Backward, needs: Needs) -> ShardGrads:
    """Strategy "atomic" (deterministic=False): one launch over (row tile, vocabulary tile) pairs, each
    adding its dH / dW / db products with float32 atomics (OWNER_ATOMIC): one logit recompute for all
    three, no fixed order of additions. Dense part only (sparse terms: _add_sparse_terms)."""
    n, d = b.hidden.shape
    v = b.weight.shape[0]
    dev = b.hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    grads = ShardGrads(torch.zeros((n, d), **f32) if needs.hidden else None,
                       torch.zeros((v, d), **f32) if needs.weight else None,
                       torch.zeros((v,), **f32) if needs.bias and b.bias is not None else None)
    cfg = configs.choose("dense_grad_atomic", b.hidden.dtype, dev)
    grid = (triton.cdiv(n, cfg.blocks["BLOCK_M"]), triton.cdiv(v, cfg.blocks["BLOCK_N"]))
    _dense_grad(b, cfg, grid, owner=OWNER_ATOMIC, weight=b.weight, bias=b.bias, chunk=v, d_hidden=grads.hidden,
                d_weight=grads.weight, d_bias=grads.bias)
    _count_uncounted()
    return grads


def _add_sparse_terms(b: _Backward, grads: ShardGrads) -> None:
    """The sparse terms of the sweep and atomic strategies, added into their float32 dH / dW / db:
    dH rows by `_sparse_grad_hidden_kernel`, dW / db rows by `_sparse_grad_weight_kernel` over the
    (row, id) pairs sorted by id (no two programs touch one row: no atomics)."""
    hidden, weight = b.hidden, b.weight
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    j = b.ids.shape[1]
    if grads.hidden is not None:
        c = configs.choose("sparse_grad_hidden", hidden.dtype, dev)
        grid = (triton.cdiv(n, c.blocks["BLOCK_R"]), triton.cdiv(d, c.blocks["BLOCK_K"]))
        _sparse_grad_hidden_kernel[grid](
            w_ptr=weight, ids_ptr=b.ids, s_ptr=b.sparse, dh_ptr=grads.hidden, N=n, V=v, D=d, J=j,
            vocab_start=b.vocab_start, stride_wv=weight.stride(0), stride_wd=weight.stride(1),
            num_warps=c.num_warps, num_stages=c.num_stages, **c.blocks)
    if grads.weight is None and grads.bias is None:
        return
    keep = (b.sparse != 0).reshape(-1)
    flat_local = (b.ids - b.vocab_start).reshape(-1)[keep]
    if flat_local.numel() == 0:
        return
    flat_row = torch.arange(n, device=dev).repeat_interleave(j)[keep]
    order = torch.sort(flat_local, stable=True).indices
    seg_id, counts = torch.unique_consecutive(flat_local[order], return_counts=True)
    seg_start = torch.zeros(seg_id.numel() + 1, dtype=torch.int64, device=dev)
    seg_start[1:] = torch.cumsum(counts, 0)
    c = configs.choose("sparse_grad_weight", hidden.dtype, dev)
    u = seg_id.numel()
    grid = (triton.cdiv(u, c.blocks["BLOCK_U"]), triton.cdiv(d, c.blocks["BLOCK_K"]) if grads.weight is not None else 1)
    _sparse_grad_weight_kernel[grid](
        h_ptr=hidden, seg_start_ptr=seg_start, seg_id_ptr=seg_id.contiguous(),
        pair_row_ptr=flat_row[order].contiguous(),
        pair_s_ptr=b.sparse.reshape(-1)[keep][order].contiguous(), dw_ptr=grads.weight, db_ptr=grads.bias,
        U=u, D=d, stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
        DO_DW=grads.weight is not None, DO_DB=grads.bias is not None, num_warps=c.num_warps,
        num_stages=c.num_stages, **c.blocks)


def check_kernel_options(options: dict) -> None:
    """ValueError for a bad kernel_options value or combination (the seam calls it before checking keys)."""
    for old, message in _RENAMED.items():
        if old in options:
            raise ValueError(message)
    strategy = options.get("strategy", DEFAULT_STRATEGY)
    if strategy not in STRATEGIES:
        raise ValueError(f"kernel_options strategy must be one of {STRATEGIES}, got {strategy!r}")
    from fused_concept.backends import triton_rows

    filter_threshold(options.get("filter_eps", "auto"), torch.float32)
    if strategy == "rows":
        wrong = [k for k in _RECOMPUTE_ONLY if options.get(k) is not None]
        wrong += ["filter_eps"] if options.get("filter_eps", "auto") not in ("auto", 0, 0.0) else []
        wrong += ["deterministic"] if options.get("deterministic", True) is not True else []
        if wrong:
            raise ValueError(f'kernel_options {wrong} apply to the recompute strategies, not strategy="rows" '
                             '(which has no tile filter and no atomics)')
        triton_rows.rows_options(**{k: options[k] for k in triton_rows.OPTIONS if k in options})
    else:
        wrong = [k for k in triton_rows.OPTIONS if k in options]
        if wrong:
            raise ValueError(f'kernel_options {wrong} apply to strategy="rows" only, got strategy={strategy!r}')


def fuses_with(options: dict) -> bool:
    """Whether these kernel_options form the gradient during the forward (strategy "rows")."""
    return options.get("strategy", DEFAULT_STRATEGY) == "rows"


def triton_stats_and_grads(canon: Canonical, *, row_scale: Tensor, needs: Needs, strategy: str = "rows",
                           deterministic: bool = True, filter_eps="auto", chunk_rows: Optional[int] = None,
                           chunk_mib=None, weight_accum: str = "float32"):
    """Strategy "rows" for a device holding the whole vocabulary: (ShardStats, ShardGrads) of the loss
    sum_i row_scale_i loss_i in one sweep (triton_rows.rows_stats_and_grads)."""
    from fused_concept.backends import triton_rows

    _check(canon.hidden, canon.weight, canon.bias)
    _softcap_arg(canon.softcap)
    check_kernel_options(dict(strategy=strategy, deterministic=deterministic, filter_eps=filter_eps))
    opts = triton_rows.rows_options(chunk_rows, triton_rows.DEFAULT_CHUNK_MIB if chunk_mib is None else chunk_mib,
                                    weight_accum)
    stats, grads = triton_rows.rows_stats_and_grads(canon, row_scale=row_scale, needs=needs, opts=opts)
    _count_uncounted()
    return stats, grads


def triton_shard_grads(canon: Canonical, grad: RowGrad, needs: Needs, *, strategy: str = DEFAULT_STRATEGY,
                       deterministic: bool = True, filter_eps="auto", vocab_splits: Optional[int] = None,
                       chunk_columns: Optional[int] = None, chunk_rows: Optional[int] = None, chunk_mib=None,
                       weight_accum: str = "float32") -> ShardGrads:
    """(d_hidden [N, D], d_weight [V, D], d_bias [V]) for this shard; None where not needed.

    Picks one of four strategies (each a function above, or triton_rows.py); backward flops:
      strategy="recompute" (default), deterministic  -> _chunked_grads (6 N D V; 4 for a frozen head)
      strategy="recompute", deterministic=False      -> _atomic_grads (6 N D V, float32 atomics)
      strategy="recompute_sweep"                     -> _hidden_sweep [+ _weight_sweep] (4 [+ 4] N D V)
      strategy="rows"                                -> triton_rows.rows_shard_grads (6 N D V, 4 frozen; the
                                                        fused forward makes this backward unnecessary)
    d_hidden is float32 (rows: the input dtype). d_weight / d_bias are in the weight's / bias's dtype from
    the chunked strategy, float32 from the others (rows: see weight_accum). grad holds the merged (global)
    lse / set_lse and the per-row coefficients.
    filter_eps (recompute strategies): drop dense tiles whose every softmax probability is below it ("auto":
    off, see AUTO_FILTER_EPS; 0 = off); the chunked strategy then skips their dH and dW products.
    vocab_splits: vocabulary slices of the d_hidden sweep (default: enough to fill the GPU within
    _SPLIT_BYTES of float32 partials; 1 under the interpreter). chunk_columns: vocabulary ids per chunk
    of the chunked strategy (default: _CHUNK_BYTES of gradient in the input dtype). chunk_rows, chunk_mib,
    weight_accum: strategy "rows" (triton_rows.py)."""
    _check(canon.hidden, canon.weight, canon.bias)
    _softcap_arg(canon.softcap)
    rows_kw = {k: v for k, v in dict(chunk_rows=chunk_rows, chunk_mib=chunk_mib).items() if v is not None}
    check_kernel_options(dict(strategy=strategy, deterministic=deterministic, filter_eps=filter_eps,
                              vocab_splits=vocab_splits, chunk_columns=chunk_columns, **rows_kw,
                              **({} if weight_accum == "float32" else {"weight_accum": weight_accum})))
    eps = filter_threshold(filter_eps, canon.hidden.dtype)
    if eps > 0 and canon.label_smoothing:
        raise ValueError(f"kernel_options filter_eps={filter_eps!r} cannot be combined with label_smoothing="
                         f"{canon.label_smoothing}: label smoothing puts gradient on every logit, so no tile may be "
                         "skipped (leave filter_eps at its default)")
    need_bias = needs.bias and canon.bias is not None
    if canon.num_rows == 0 or not (needs.hidden or needs.weight or need_bias):
        return _empty_grads(canon, needs, chunked=deterministic and strategy == "recompute")
    if strategy == "rows":
        from fused_concept.backends import triton_rows

        _count_uncounted()
        return triton_rows.rows_shard_grads(canon, grad, needs, triton_rows.rows_options(weight_accum=weight_accum,
                                                                                       **rows_kw))
    b = _backward_inputs(canon, grad, eps)
    if not deterministic:
        grads = _atomic_grads(b, needs)
    elif strategy == "recompute":
        return _chunked_grads(b, needs, chunk_columns)  # sparse terms included
    else:
        grads = ShardGrads(_hidden_sweep(b, vocab_splits) if needs.hidden else None, *_weight_sweep(b, needs))
        _count_uncounted()
    _add_sparse_terms(b, grads)
    return grads


def _empty_grads(canon: Canonical, needs: Needs, *, chunked: bool) -> ShardGrads:
    """Zero gradients of the right shapes and dtypes (no rows, or nothing asked for)."""
    n, d = canon.hidden.shape
    v = canon.weight.shape[0]
    dev = canon.hidden.device
    return ShardGrads(
        torch.zeros((n, d), dtype=torch.float32, device=dev) if needs.hidden else None,
        torch.zeros((v, d), dtype=canon.weight.dtype if chunked else torch.float32, device=dev) if needs.weight else None,
        torch.zeros((v,), dtype=canon.bias.dtype if chunked else torch.float32, device=dev)
        if needs.bias and canon.bias is not None else None)


# ------------------------------------------------------------------------------------------- tile count
class TileCount:
    """What the backwards run inside `count_tiles()` did: `total` logit tiles recomputed by the chunked
    strategy and `kept` of them multiplied out (an int, read on access); `kept` is None when another
    strategy ran (they do not count)."""

    def __init__(self):
        self.total = 0
        self._kept = []
        self._uncounted = False

    @property
    def kept(self) -> Optional[int]:
        if self._uncounted:
            return None
        return sum(k if isinstance(k, int) else int(k.sum().item()) for k in self._kept)


_COUNTERS: list = []


@contextlib.contextmanager
def count_tiles():
    """`with count_tiles() as c: <backward>` then c.total, c.kept (FLOP accounting of the benchmarks;
    costs one small copy per chunk while active, nothing otherwise)."""
    counter = TileCount()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count_tiles(total: int, kept_per_row: Optional[Tensor]) -> None:
    """Record a chunk of the chunked strategy: `total` tiles, kept per tile row (None: all kept)."""
    for counter in _COUNTERS:
        counter.total += total
        counter._kept.append(total if kept_per_row is None else kept_per_row.clone())


def _count_uncounted() -> None:
    """Record that a strategy without tile counts ran."""
    for counter in _COUNTERS:
        counter._uncounted = True
