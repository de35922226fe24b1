"""The memory-efficient path in plain PyTorch (what CPU users get; the fallback everywhere).

Rows are processed in chunks; only one chunk of logits `z_c = h_c W^T (+ b)` [rows, V] is alive at
a time. Per chunk it computes the shard statistics of docs/internals.md (max/argmax, log-sum-exp,
target logit, set log-sum-exp, soft dot) and, when asked, the logit gradient

    dz = coef_dense * exp(z - lse) - coef_target * onehot(y) - coef_set * q      (q: see _rowmath)

followed by `d_hidden_c = dz W`, `d_weight += dz^T h_c`, `d_bias += sum_rows dz`.

`torch_stats_and_grads` does both in one sweep (the gradient of the summed loss, computed while the
chunk's logits are still in memory), so the backward only scales: no logits are recomputed.

One [rows, V] buffer per chunk: exp(z - max) and then the logit gradient are formed in place in the
logits' buffer once the few logits still needed (target, concept ids) are gathered; a softcap needs z
itself for its derivative, so the fused sweep keeps a second buffer then. Chunk size: see CHUNK_ELEMENTS.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_concept.backends.products import mm_into, wide_products
from fused_concept.core.inputs import Canonical
from fused_concept.core.rowmath import (Needs, RowGrad, ShardGrads, ShardStats, acc_dtype, grad_coefficients,
                                         row_terms)

# Most elements of one [rows, V] float32 chunk buffer (x4 bytes), on the CPU: 2**25 = 128 MiB, 682 rows at
# SmolLM2's V = 49152. Chunks of ~170 rows (2**23) made forward+backward 1.28x the same three products in
# 512-row chunks on a 2-core EPYC; 512+ rows bring it to the products' own speed (benchmarks/run.py's
# gemm_floor line) while the transient memory stays far below the naive loss's several N x V copies.
CHUNK_ELEMENTS = 2 ** 25
# The same on CUDA: 2**27 = 512 MiB, ~1000 rows at V = 128256, so each chunk's products keep a large GPU
# busy (chosen by size, not measured on a GPU yet).
CUDA_CHUNK_ELEMENTS = 2 ** 27


def _rows_per_chunk(n: int, v: int, chunk_rows: Optional[int], device: torch.device) -> int:
    """chunk_rows, or as many rows as one buffer of (CUDA_)CHUNK_ELEMENTS holds, spread evenly over the
    chunks (no small last chunk)."""
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    budget = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    most = max(1, min(n, budget // max(v, 1)))
    return max(1, -(-n // -(-n // most))) if n else 1


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float],
            out: Optional[Tensor] = None):
    """Logits of a chunk in the accumulation dtype (float32, or float64 for float64 inputs), capped.
    `out` is a reusable [rows, V] buffer: reusing it keeps the heap from growing chunk after chunk."""
    acc = acc_dtype(h)
    if out is not None and (h.dtype == acc or wide_products(h)):
        z = out[: h.shape[0]]
        mm_into(h, weight.t(), z, accumulate=False)
    else:  # 16-bit on the CPU: the product is rounded to the input dtype, then widened
        z = (h @ weight.t()).to(acc)
    if bias is not None:
        z += bias.to(acc)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _chunk_buffers(n: int, v: int, step: int, hidden: Tensor, count: int):
    """`count` reusable [step, V] buffers in the accumulation dtype (one per live chunk tensor)."""
    rows = min(n, step)
    return [torch.empty(rows, v, dtype=acc_dtype(hidden), device=hidden.device) for _ in range(count)]


def _local(ids: Tensor, vocab_start: int, v: int):
    """Map global ids to this shard: (local index clamped into range, mask of ids in the shard)."""
    local = ids - vocab_start
    inside = (ids >= 0) & (local >= 0) & (local < v)
    return local.clamp(0, v - 1), inside


def _chunk_stats(z: Tensor, part: Canonical, exp_out: Optional[Tensor] = None):
    """Statistics of one chunk of rows (`part`), the logits at its concept-set ids (for q), and
    e = exp(z - max) with its row sums, which the fused sweep turns into softmax(z) without a second
    exponential pass. e is written into exp_out, which may be z's own buffer: z is not read after."""
    v, vocab_start = z.shape[1], part.vocab_start
    best, arg = z.max(dim=1)
    t_local, t_in = _local(part.targets, vocab_start, v)
    target_logit = torch.where(t_in, z.gather(1, t_local[:, None]).squeeze(1), torch.zeros_like(best))
    set_logits = None
    if part.set_ids.shape[1] > 0:
        s_local, s_in = _local(part.set_ids, vocab_start, v)
        set_logits = z.gather(1, s_local)
        set_lse = torch.logsumexp(set_logits.masked_fill(~s_in, float("-inf")), dim=1)
    else:
        set_lse = torch.full_like(best, float("-inf"))
    if part.soft and part.soft_ids.shape[1] > 0:
        k_local, k_in = _local(part.soft_ids, vocab_start, v)
        soft_dot = (z.gather(1, k_local) * part.soft_weights).masked_fill(~k_in, 0.0).sum(dim=1)
    else:
        soft_dot = torch.zeros_like(best)
    logit_sum = z.sum(dim=1) if part.label_smoothing else None
    e = torch.sub(z, best[:, None], out=None if exp_out is None else exp_out[: z.shape[0]])
    e.exp_()
    sumexp = e.sum(dim=1)
    stats = ShardStats(best, arg + vocab_start, best + torch.log(sumexp), target_logit, set_lse, soft_dot, logit_sum)
    return stats, set_logits, e, sumexp


def _chunk_dlogits(z: Optional[Tensor], part: Canonical, grad: RowGrad, probs_unnormalised=None, row_sums=None,
                   set_logits=None) -> Tensor:
    """dL/dz_raw for one chunk of rows, [rows, V] in the accumulation dtype. z holds the (capped) logits.

    The dense term coef_dense * softmax(z) is built in place: in `probs_unnormalised` (exp(z - max),
    divided here by `row_sums`) when given, else in z itself. With probs_unnormalised, z is read only
    for the softcap derivative (it may be None without softcap) and the concept-set logits come as
    `set_logits` (gathered before z was overwritten)."""
    v = (z if z is not None else probs_unnormalised).shape[1]
    vocab_start, softcap = part.vocab_start, part.softcap
    t_local, t_in = _local(part.targets, vocab_start, v)
    q = None
    if part.soft:
        if part.soft_ids.shape[1] > 0:
            k_local, k_in = _local(part.soft_ids, vocab_start, v)
            q_ids, q = k_local, (grad.coef_set[:, None] * part.soft_weights).masked_fill(~k_in, 0.0)
    elif part.set_ids.shape[1] > 0:
        s_local, s_in = _local(part.set_ids, vocab_start, v)
        set_lse = grad.set_lse
        safe_set = torch.where(torch.isfinite(set_lse), set_lse, torch.zeros_like(set_lse))
        zs = z.gather(1, s_local) if set_logits is None else set_logits
        q = torch.exp(zs - safe_set[:, None]).masked_fill(~s_in, 0.0)
        q_ids, q = s_local, grad.coef_set[:, None] * q
    cap_factor = None
    if softcap is not None:
        cap_factor = torch.div(z, softcap).square_().neg_().add_(1.0)
    if probs_unnormalised is not None:
        dz = probs_unnormalised.mul_((grad.coef_dense / row_sums)[:, None])
    else:
        dz = z.sub_(grad.lse[:, None]).exp_().mul_(grad.coef_dense[:, None])
    if grad.coef_uniform is not None:  # label smoothing: eps / V of the target mass on every id
        dz.sub_(grad.coef_uniform[:, None])
    dz.scatter_add_(1, t_local[:, None], (-grad.coef_target * t_in)[:, None])
    if q is not None:
        # set ids are unique per row; soft ids may repeat and then add up, as q_v = sum_{k: C_k = v} w_k
        dz.scatter_add_(1, q_ids, -q)
    if cap_factor is not None:
        dz.mul_(cap_factor)
    return dz


def _chunks(n: int, v: int, chunk_rows: Optional[int], device: torch.device):
    step = _rows_per_chunk(n, v, chunk_rows, device)
    # N = 0 still gets one (empty) chunk, so that the statistics come back as [0] tensors
    return step, [(lo, min(n, lo + step)) for lo in range(0, max(n, 1), step)]


def _cat_stats(parts) -> ShardStats:
    if len(parts) == 1:
        return parts[0]
    return ShardStats(*(None if field[0] is None else torch.cat(field) for field in zip(*parts)))


def torch_partial_stats(canon: Canonical, *, chunk_rows: Optional[int] = None) -> ShardStats:
    """Step 1 of docs/internals.md over this shard's ids, one chunk of logits at a time."""
    n, v = canon.num_rows, canon.weight.shape[0]
    step, spans = _chunks(n, v, chunk_rows, canon.hidden.device)
    (z_buf,) = _chunk_buffers(n, v, step, canon.hidden, 1)
    parts = []
    for lo, hi in spans:
        part = canon.rows(lo, hi)
        z = _logits(part.hidden, canon.weight, canon.bias, canon.softcap, out=z_buf)
        parts.append(_chunk_stats(z, part, exp_out=z_buf if z.data_ptr() == z_buf.data_ptr() else None)[0])
    return _cat_stats(parts)


def _accumulate(dz, h_c, weight, lo, hi, grads: ShardGrads):
    """d_hidden[lo:hi] = dz W, d_weight += dz^T h_c, d_bias += column sums of dz. For 16-bit inputs on a
    GPU the products take dz rounded to the input dtype (as the Triton path's dR does) on the tensor
    cores, accumulating in float32; elsewhere they run in dz's dtype."""
    if wide_products(h_c):
        dz16 = dz.to(h_c.dtype)
        if grads.hidden is not None:
            mm_into(dz16, weight, grads.hidden[lo:hi], accumulate=False)
        if grads.weight is not None:
            mm_into(dz16.t(), h_c, grads.weight, accumulate=True)
        if grads.bias is not None:
            grads.bias.add_(dz.sum(dim=0))
        return
    if grads.hidden is not None:
        torch.mm(dz, weight.to(dz.dtype), out=grads.hidden[lo:hi])
    if grads.weight is not None:
        grads.weight.addmm_(dz.t(), h_c.to(dz.dtype))
    if grads.bias is not None:
        grads.bias.add_(dz.sum(dim=0))


def _grad_buffers(canon: Canonical, needs: Needs) -> ShardGrads:
    n, d = canon.hidden.shape
    v = canon.weight.shape[0]
    kw = dict(dtype=acc_dtype(canon.hidden), device=canon.hidden.device)
    return ShardGrads(
        torch.empty(n, d, **kw) if needs.hidden else None,
        torch.zeros(v, d, **kw) if needs.weight else None,
        torch.zeros(v, **kw) if needs.bias and canon.bias is not None else None,
    )


def torch_shard_grads(canon: Canonical, grad: RowGrad, needs: Needs, *,
                      chunk_rows: Optional[int] = None) -> ShardGrads:
    """Step 3 of docs/internals.md: recompute each chunk's logits and accumulate the gradients."""
    n, v = canon.num_rows, canon.weight.shape[0]
    grads = _grad_buffers(canon, needs)
    step, spans = _chunks(n, v, chunk_rows, canon.hidden.device)
    (z_buf,) = _chunk_buffers(n, v, step, canon.hidden, 1)
    for lo, hi in spans:
        part = canon.rows(lo, hi)
        z = _logits(part.hidden, canon.weight, canon.bias, canon.softcap, out=z_buf)
        dz = _chunk_dlogits(z, part, grad.rows(lo, hi))  # overwrites z
        del z
        _accumulate(dz, part.hidden, canon.weight, lo, hi, grads)
    return grads


def torch_stats_and_grads(canon: Canonical, *, row_scale: Tensor, needs: Needs,
                          chunk_rows: Optional[int] = None):
    """One sweep for a single device holding the whole vocabulary: statistics of every row plus the
    gradient of sum_i row_scale_i * loss_i (row_scale: 1 for "sum", 1/N_valid for "mean")."""
    n, v = canon.num_rows, canon.weight.shape[0]
    grads = _grad_buffers(canon, needs)
    step, spans = _chunks(n, v, chunk_rows, canon.hidden.device)
    # exp(z - max) goes into z's buffer unless the softcap derivative still needs z
    buffers = _chunk_buffers(n, v, step, canon.hidden, 1 if canon.softcap is None else 2)
    parts = []
    for lo, hi in spans:
        part = canon.rows(lo, hi)
        z = _logits(part.hidden, canon.weight, canon.bias, canon.softcap, out=buffers[0])
        in_place = canon.softcap is None and z.data_ptr() == buffers[0].data_ptr()
        st, set_logits, e, sumexp = _chunk_stats(z, part, exp_out=buffers[0] if in_place else buffers[-1])
        parts.append(st)
        terms = row_terms(st, part)
        grad = grad_coefficients(row_scale[lo:hi], part, lse=st.lse, set_lse=st.set_lse, hinge=terms.hinge)
        dz = _chunk_dlogits(None if in_place else z, part, grad, probs_unnormalised=e, row_sums=sumexp,
                            set_logits=set_logits)
        del z, e
        _accumulate(dz, part.hidden, canon.weight, lo, hi, grads)
        del dz
    return _cat_stats(parts), grads
