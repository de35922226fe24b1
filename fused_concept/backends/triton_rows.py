"""Strategy "rows" of the Triton path (`kernel_options={"strategy": "rows"}`): row chunks, the logits on
cuBLAS, the gradient formed in the forward. 6 N D V flops for a trainable head, 4 N D V for a frozen one
(the recompute strategies of triton_path.py: 8 and 6).

Per chunk of C rows (C from a memory budget, `chunk_rows_for`: the chunk's logits take at most
`chunk_mib` MiB, 256 by default, and C is a multiple of 128 rows, which the kernel's BLOCK_R divides;
not derived from V / D):
  1. z_c = h_c W^T on cuBLAS: torch.mm into one reused [C, V] buffer in the input dtype (float32 inputs:
     float32),
  2. one `_chunk_rows_kernel` launch (kernels/chunk_rows.py) reads z_c, writes the row statistics and
     overwrites z_c with the logit gradient dz_c: FUSED, the gradient of sum_i g_i loss_i with the row
     math done in the kernel; GIVEN (backward), from the merged statistics and rowmath's coefficients,
  3. dH_c = dz_c W (cuBLAS, written once, in the input dtype), dW += dz_c^T h_c (cuBLAS with beta = 1;
     the first chunk writes with beta = 0), db += column sums of dz_c (float32).

dW accumulation (`weight_accum`): a float32 weight accumulates into its own float32 gradient. A 16-bit
weight accumulates by default ("float32") into a float32 accumulator: cuBLAS with a float32 output
(aten::mm.dtype_out), V * D * 4 bytes, read and written once per chunk, cast to the weight's dtype by the
caller at the end. "weight" accumulates in the weight's dtype with beta = 1, as Liger-Kernel does by
default: half the memory and half the read-modify-write traffic ((N / C - 1) V D b bytes with a b-byte
accumulator), but one rounding of the running sum per chunk, so its error grows with the number of
chunks (tests/backends/test_triton_rows.py measures both against float64 at 64 chunks).

Where it runs: the single-device loss with reduction "mean" / "sum" and a gradient wanted calls
`rows_stats_and_grads` in its forward (the backward only scales by the upstream scalar). Everything else
(reduction="none", a retained graph's second backward, a vocabulary shard) runs the forward on
`triton_partial_stats` and `rows_shard_grads` in the backward, which recomputes the logits (8 N D V).
No host synchronisation anywhere; memory: one [C, V] buffer, the gradients, [N] statistics and the
[N, J] id table.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from fused_concept.backends.products import mm_into, wide_products
from fused_concept.core.inputs import Canonical
from fused_concept.core.rowmath import Needs, RowGrad, ShardGrads, ShardStats
from fused_concept.kernels import configs
from fused_concept.kernels.chunk_rows import _chunk_rows_kernel

# the default memory budget of one chunk of logits (kernel_options chunk_mib)
DEFAULT_CHUNK_MIB = 256
# chunk rows come in multiples of this (the products' tiles); configs' "chunk_rows" BLOCK_R divides it
ROW_MULTIPLE = 128
WEIGHT_ACCUM = ("float32", "weight")
# the kernel_options that only this strategy reads
OPTIONS = ("chunk_rows", "chunk_mib", "weight_accum")


class RowsOptions(NamedTuple):
    chunk_rows: Optional[int]  # rows per chunk, or None: from chunk_mib
    chunk_mib: float
    weight_accum: str


def rows_options(chunk_rows=None, chunk_mib=DEFAULT_CHUNK_MIB, weight_accum="float32") -> RowsOptions:
    """The strategy's kernel_options, checked (ValueError names the option and the value)."""
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"kernel_options chunk_rows must be None or a positive int, got {chunk_rows!r}")
    if isinstance(chunk_mib, bool) or not isinstance(chunk_mib, (int, float)) or not 0 < chunk_mib < float("inf"):
        raise ValueError(f"kernel_options chunk_mib must be a positive number of MiB, got {chunk_mib!r}")
    if weight_accum not in WEIGHT_ACCUM:
        raise ValueError(f"kernel_options weight_accum must be one of {WEIGHT_ACCUM}, got {weight_accum!r}")
    return RowsOptions(chunk_rows, float(chunk_mib), weight_accum)


def chunk_rows_for(n: int, v: int, dtype: torch.dtype, opts: RowsOptions, block_r: int) -> int:
    """Rows per chunk: `chunk_rows` rounded down to a multiple of block_r, or the most rows whose [rows, V]
    logits in `dtype` fit in chunk_mib MiB, in multiples of ROW_MULTIPLE (of block_r when fewer fit);
    never more than N needs."""
    if ROW_MULTIPLE % block_r:
        raise RuntimeError(f"chunk_rows BLOCK_R {block_r} must divide {ROW_MULTIPLE} (kernels/configs.py)")
    if opts.chunk_rows is not None:
        step = opts.chunk_rows // block_r * block_r
    else:
        fit = int(opts.chunk_mib * 2 ** 20) // (max(v, 1) * torch.finfo(dtype).bits // 8)
        unit = ROW_MULTIPLE if fit >= ROW_MULTIPLE else block_r
        step = fit // unit * unit
    return min(max(block_r, step), triton.cdiv(max(n, 1), block_r) * block_r)


def _id_table(canon: Canonical) -> Tensor:
    """[N, J] int64: column 0 the target, then the set ids, then the soft ids (global ids, -1 pads)."""
    parts = [canon.targets.reshape(-1, 1).to(torch.int64), canon.set_ids.to(torch.int64)]
    if canon.soft_ids is not None:
        parts.append(canon.soft_ids.to(torch.int64))
    return torch.cat(parts, dim=1).contiguous()


def _chunks(canon: Canonical, opts: RowsOptions, cfg: configs.LaunchConfig):
    """Yields (lo, hi, z) per chunk of rows, z [hi - lo, V] holding h[lo:hi] W^T (one reused buffer)."""
    hidden, weight = canon.hidden, canon.weight
    n, v = canon.num_rows, weight.shape[0]
    step = chunk_rows_for(n, v, hidden.dtype, opts, cfg.blocks["BLOCK_R"])
    buf = torch.empty((min(n, step), v), dtype=hidden.dtype, device=hidden.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        z = buf[:hi - lo]
        torch.mm(hidden[lo:hi], weight.t(), out=z)
        yield lo, hi, z


class _Grads:
    """dH (input dtype, each chunk's rows written once), the dW accumulator (see the module docstring) and
    db (float32) of the strategy; `add` takes one chunk's logit gradient."""

    def __init__(self, canon: Canonical, needs: Needs, weight_accum: str):
        hidden, weight, bias = canon.hidden, canon.weight, canon.bias
        dev = hidden.device
        acc = weight.dtype if weight.dtype == torch.float32 or weight_accum == "weight" else torch.float32
        empty = canon.num_rows == 0  # then no chunk writes anything: zeros
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if needs.hidden else None
        self.weight = None
        if needs.weight:
            self.weight = (torch.zeros if empty else torch.empty)(weight.shape, dtype=acc, device=dev)
        self.bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) \
            if needs.bias and bias is not None else None
        self._w, self._first = weight, True

    def add(self, dz: Tensor, h_c: Tensor, lo: int, hi: int) -> None:
        if self.hidden is not None:
            torch.mm(dz, self._w, out=self.hidden[lo:hi])
        if self.weight is not None:
            _weight_product(dz.t(), h_c, self.weight, accumulate=not self._first)
        if self.bias is not None:
            self.bias += dz.sum(dim=0, dtype=torch.float32)
        self._first = False

    def result(self) -> ShardGrads:
        return ShardGrads(self.hidden, self.weight, self.bias)


def _weight_product(a: Tensor, b: Tensor, c: Tensor, *, accumulate: bool) -> None:
    """c = [c +] a @ b: in c's dtype when it is a's (beta = 1 when accumulating); a float32 c of 16-bit a, b
    on cuBLAS with a float32 output (16-bit products, float32 sums), elsewhere (CPU, the interpreter) on
    float32 copies of a and b, which computes the same thing."""
    if c.dtype == a.dtype:
        if accumulate:
            c.addmm_(a, b)
        else:
            torch.mm(a, b, out=c)
    elif wide_products(a):
        mm_into(a, b, c, accumulate=accumulate)
    elif accumulate:
        c.addmm_(a.float(), b.float())
    else:
        torch.mm(a.float(), b.float(), out=c)


def _launch(z: Tensor, canon: Canonical, ids: Tensor, lo: int, hi: int, cfg: configs.LaunchConfig, *,
            fused: Optional[dict] = None, given: Optional[dict] = None) -> None:
    """One `_chunk_rows_kernel` launch over rows lo:hi (their logits in z): FUSED with `fused` (g, alpha,
    beta and the [N] statistics it writes), GIVEN with `given` (lse, set_lse and the coefficients)."""
    rows = slice(lo, hi)
    part = {k: None if t is None else t[rows] for k, t in (fused or given).items()}
    none = dict.fromkeys(("g_ptr", "alpha_ptr", "beta_ptr", "max_ptr", "arg_ptr", "target_ptr", "soft_dot_ptr",
                          "zsum_ptr", "coef_dense_ptr", "coef_target_ptr", "coef_set_ptr", "uni_ptr"))
    eps, bias = canon.label_smoothing, canon.bias
    j = ids.shape[1]
    soft_w = None if canon.soft_weights is None else canon.soft_weights[rows]
    _chunk_rows_kernel[(triton.cdiv(hi - lo, cfg.blocks["BLOCK_R"]),)](
        z_ptr=z, b_ptr=bias, ids_ptr=ids[rows], soft_w_ptr=soft_w,
        **dict(none, **part), C=hi - lo, V=canon.weight.shape[0], J=j, S=canon.set_ids.shape[1],
        vocab_start=canon.vocab_start, softcap=0.0 if canon.softcap is None else float(canon.softcap),
        margin=0.0 if canon.margin is None else float(canon.margin), z_loss=float(canon.z_loss),
        target_scale=1.0 - eps, uni_scale=eps / canon.vocab_size if fused is not None and eps else 0.0,
        stride_z=z.stride(0), stride_b=0 if bias is None else bias.stride(0), BLOCK_J=triton.next_power_of_2(j),
        EMULATE_RNE=configs.interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.blocks)


def _stats_buffers(canon: Canonical) -> ShardStats:
    n, dev = canon.num_rows, canon.hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    return ShardStats(max=torch.empty(n, **f32), argmax=torch.empty(n, dtype=torch.int64, device=dev),
                      lse=torch.empty(n, **f32), target_logit=torch.empty(n, **f32), set_lse=torch.empty(n, **f32),
                      soft_dot=torch.empty(n, **f32),
                      logit_sum=torch.empty(n, **f32) if canon.label_smoothing else None)


def rows_stats_and_grads(canon: Canonical, *, row_scale: Tensor, needs: Needs, opts: RowsOptions):
    """(ShardStats, ShardGrads) of the whole vocabulary in one sweep: the statistics of every row and the
    gradients of sum_i row_scale_i loss_i (FUSED launches), chunk by chunk."""
    stats = _stats_buffers(canon)
    grads = _Grads(canon, needs, opts.weight_accum)
    cfg = configs.choose("chunk_rows", canon.hidden.dtype, canon.hidden.device)
    ids = _id_table(canon)
    fused = dict(g_ptr=row_scale.to(torch.float32).contiguous(), alpha_ptr=canon.ntp_weight.contiguous(),
                 beta_ptr=canon.concept_weight.contiguous(), max_ptr=stats.max, arg_ptr=stats.argmax,
                 lse_ptr=stats.lse, target_ptr=stats.target_logit, set_lse_ptr=stats.set_lse,
                 soft_dot_ptr=stats.soft_dot, zsum_ptr=stats.logit_sum)
    for lo, hi, z in _chunks(canon, opts, cfg):
        _launch(z, canon, ids, lo, hi, cfg, fused=fused)
        grads.add(z, canon.hidden[lo:hi], lo, hi)
    return stats, grads.result()


def rows_shard_grads(canon: Canonical, grad: RowGrad, needs: Needs, opts: RowsOptions) -> ShardGrads:
    """Step 3 of docs/internals.md for this shard: per chunk the logits again, then the gradient from the
    merged statistics and coefficients `grad` (GIVEN launches) and the products."""
    grads = _Grads(canon, needs, opts.weight_accum)
    cfg = configs.choose("chunk_rows", canon.hidden.dtype, canon.hidden.device)
    ids = _id_table(canon)
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    given = dict(lse_ptr=f32(grad.lse), set_lse_ptr=f32(grad.set_lse), coef_dense_ptr=f32(grad.coef_dense),
                 coef_target_ptr=f32(grad.coef_target), coef_set_ptr=f32(grad.coef_set),
                 uni_ptr=f32(grad.coef_uniform))
    for lo, hi, z in _chunks(canon, opts, cfg):
        _launch(z, canon, ids, lo, hi, cfg, given=given)
        grads.add(z, canon.hidden[lo:hi], lo, hi)
    return grads.result()
