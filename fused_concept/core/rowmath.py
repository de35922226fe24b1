"""Row-level math shared by every implementation (step 2 of docs/internals.md).

Everything that touches the vocabulary lives in the implementations; once a row's statistics are
known, its loss and the three scalars that shape its logit gradient are O(1) work, computed here
once for all implementations (reference, torch, triton, vocab-parallel):

    ce_i    = lse_i - z_{i,y_i}                                 (the gold NLL, reported in the stats)
    tok_i   = lse_i - (1 - eps) z_{i,y_i} - (eps / V) sum_v z_iv  (the token term; = ce_i without label smoothing eps)
    mass_i  = exp(lse_S_i - lse_i)                              (probability mass of the concept set)
    cl_i    = lse_i - lse_S_i        (marginal)  |  lse_i - sum_k w_ik z_{i,C_ik}   (soft)
    hinge_i = [mass_i < margin]      (1 without a margin; a constant for the gradient)
    loss_i  = a_i tok_i + b_i hinge_i cl_i + z_loss lse_i^2     (a, b: ntp_weight, concept_weight; 0 on ignored rows)

    dL/dz_i = coef_dense_i * softmax(z_i) - coef_uniform_i - coef_target_i * onehot(y_i) - coef_set_i * q_i
    coef_dense   = g_i (a_i + b_i hinge_i + 2 z_loss lse_i)
    coef_uniform = g_i a_i eps / V            (every id of the global vocabulary; 0 without label smoothing)
    coef_target  = g_i a_i (1 - eps)
    coef_set     = g_i b_i hinge_i
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fused_concept.core.inputs import Canonical


class ShardStats(NamedTuple):
    """Per-row statistics of one vocabulary shard (all [N]; float32 except argmax)."""

    max: Tensor  # max_v z_v over the shard
    argmax: Tensor  # int64 global id of the first maximum
    lse: Tensor  # log sum_v exp z_v over the shard
    target_logit: Tensor  # z_y when y lies in the shard, else 0
    set_lse: Tensor  # log sum_{t in S, t in shard} exp z_t; -inf when no set id lies in the shard
    soft_dot: Tensor  # sum_k w_k z_{C_k} over the k whose id lies in the shard (0 without soft ids)
    logit_sum: Optional[Tensor] = None  # sum_v z_v over the shard; only with label smoothing (else None)


class RowGrad(NamedTuple):
    """What one shard's backward needs per row (all [N] float32): the GLOBAL (merged) lse and set_lse,
    and the coefficients of dL/dz = dense * softmax - uniform - target * onehot(y) - set * q."""

    lse: Tensor
    set_lse: Tensor
    coef_dense: Tensor
    coef_target: Tensor
    coef_set: Tensor
    coef_uniform: Optional[Tensor] = None  # None without label smoothing

    def rows(self, lo: int, hi: int) -> "RowGrad":
        return RowGrad(*(None if t is None else t[lo:hi] for t in self))


class Needs(NamedTuple):
    """Which gradients a backward must produce (False where autograd wants none, or under no_grad)."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


class ShardGrads(NamedTuple):
    """A shard's gradients, None where not needed: d_hidden [N, D] (this shard's partial sum),
    d_weight [V_shard, D], d_bias [V_shard]; float32 or the input dtype (the caller casts)."""

    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]


class RowTerms(NamedTuple):
    loss: Tensor  # loss_i, 0 on ignored rows
    ce: Tensor  # ce_i, 0 on ignored rows
    cl: Tensor  # cl_i after the hinge, 0 on rows without a concept term
    mass: Tensor  # concept-set probability mass, 0 on rows without a set
    hinge: Tensor  # 1.0 / 0.0


def acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype row statistics and gradient buffers are accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _merge_lse(values: Tensor) -> Tensor:
    """log-sum-exp over dim 0 that keeps -inf (not NaN) when every entry is -inf."""
    top = values.max(dim=0).values
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return safe_top + torch.log(torch.exp(values - safe_top).sum(dim=0))


def merge_stats(parts: Sequence[ShardStats]) -> ShardStats:
    """Combine the statistics of disjoint vocabulary shards into those of their union."""
    if len(parts) == 1:
        return parts[0]
    maxes = torch.stack([p.max for p in parts])
    best = maxes.max(dim=0).values
    # lowest global id among the shards that hold the maximum (shards are passed in id order)
    hit = maxes == best
    first_shard = hit.float().argmax(dim=0)
    argmax = torch.stack([p.argmax for p in parts]).gather(0, first_shard[None]).squeeze(0)
    return ShardStats(
        max=best,
        argmax=argmax,
        lse=_merge_lse(torch.stack([p.lse for p in parts])),
        target_logit=torch.stack([p.target_logit for p in parts]).sum(0),
        set_lse=_merge_lse(torch.stack([p.set_lse for p in parts])),
        soft_dot=torch.stack([p.soft_dot for p in parts]).sum(0),
        logit_sum=None if parts[0].logit_sum is None else torch.stack([p.logit_sum for p in parts]).sum(0),
    )


def nonfinite_rows(canon: "Canonical") -> Tensor:
    """[N] bool: the rows the non-finite policy of docs/math.md makes NaN. A row is hit when its hidden
    state holds a NaN or an infinity, or when the head does (any NaN / inf in the weight; NaN or +inf in
    the bias: -inf bias entries are masks, not errors). Tested through sums in the accumulation dtype: a
    NaN or inf entry always makes its sum non-finite, while finite entries overflow it only beyond 3e38,
    where the logits overflow too. One read of hidden and of the head, no host synchronisation."""
    acc = acc_dtype(canon.hidden)
    bad = ~torch.isfinite(canon.hidden.sum(dim=1, dtype=acc))
    head_bad = ~torch.isfinite(canon.weight.sum(dtype=acc))
    if canon.bias is not None:
        head_bad = head_bad | torch.isnan(canon.bias).any() | torch.isposinf(canon.bias).any()
    return bad | head_bad


def poison_stats(stats: ShardStats, bad: Tensor) -> ShardStats:
    """`stats` with lse = NaN on the rows `bad` (see `nonfinite_rows`). Every row quantity is built on
    lse, so ce, cl, mass and the loss of those rows come out NaN, vocabulary shards merge the NaN into
    the global lse, and a backward that recomputes softmax = exp(z - lse) gets a NaN logit gradient."""
    return stats._replace(lse=torch.where(bad, torch.full_like(stats.lse, float("nan")), stats.lse))


def row_terms(stats: ShardStats, canon: "Canonical") -> RowTerms:
    """Row losses from merged statistics. Differentiable through the statistics (the reference uses
    autograd through it); the hinge is detached, as in the paper's code."""
    valid, has_set, lse = canon.valid, canon.has_set, stats.lse
    zero = torch.zeros_like(lse)
    ce = torch.where(valid, lse - stats.target_logit, zero)
    # empty sets have set_lse = -inf: keep the unselected branch finite so no NaN leaks into gradients
    set_lse = torch.where(has_set, stats.set_lse, lse)
    mass = torch.where(has_set, torch.exp(set_lse - lse), zero)
    raw_cl = lse - stats.soft_dot if canon.soft else lse - set_lse
    hinge = _hinge(mass, canon.margin)
    cl = torch.where(has_set, raw_cl * hinge, zero)
    loss = canon.ntp_weight * _token_term(ce, stats, canon) + canon.concept_weight * cl
    if canon.z_loss:
        loss = loss + canon.z_loss * lse * lse
    loss = torch.where(valid, loss, zero)
    return RowTerms(loss=loss, ce=ce, cl=cl, mass=mass, hinge=hinge)


def _hinge(mass: Tensor, margin: Optional[float]) -> Tensor:
    """[mass < margin] as 1.0 / 0.0 (all ones without a margin), NaN where the mass is NaN."""
    if margin is None:
        return torch.ones_like(mass)
    hinge = (mass.detach() < margin).to(mass.dtype)
    # NaN inputs: keep the NaN visible instead of letting the comparison turn it into 0
    return torch.where(torch.isnan(mass.detach()), mass.detach(), hinge)


def _token_term(ce: Tensor, stats: ShardStats, canon: "Canonical") -> Tensor:
    """ce_i, or with label smoothing eps the cross-entropy against (1 - eps) onehot(y) + eps / V:
    lse - (1 - eps) z_y - (eps / V) sum_v z_v = ce + eps (z_y - mean_v z_v)."""
    eps = canon.label_smoothing
    if not eps:
        return ce
    if stats.logit_sum is None:
        raise RuntimeError("label smoothing needs the statistic logit_sum, which the backend did not compute")
    mean_logit = stats.logit_sum / canon.vocab_size
    return torch.where(canon.valid, ce + eps * (stats.target_logit - mean_logit), ce)


def reduce_rows(loss_rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """'none' keeps rows, 'sum' adds them, 'mean' divides by the number of valid rows (0 when none)."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def upstream_per_row(grad_out: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """The gradient of the reduced loss w.r.t. each row loss, as an [N] float32 vector."""
    n = valid.shape[0]
    if reduction == "none":
        return grad_out.reshape(n).float()
    g = grad_out.float().expand(n)
    if reduction == "mean":
        g = g / valid.sum().clamp(min=1).float()
    return g


def grad_coefficients(g: Tensor, canon: "Canonical", *, lse: Tensor, set_lse: Tensor, hinge: Tensor) -> RowGrad:
    """The backward's per-row inputs for upstream gradient g ([N]) and merged statistics; the
    coefficients are zero on ignored rows."""
    valid = canon.valid
    zero = torch.zeros_like(lse)
    set_term = torch.where(canon.has_set, canon.concept_weight * hinge, zero)
    dense = canon.ntp_weight + set_term
    if canon.z_loss:
        dense = dense + 2.0 * canon.z_loss * lse
    eps = canon.label_smoothing
    token = torch.where(valid, g * canon.ntp_weight, zero)
    return RowGrad(lse=lse, set_lse=set_lse, coef_dense=torch.where(valid, g * dense, zero),
                   coef_target=token * (1.0 - eps) if eps else token, coef_set=torch.where(valid, g * set_term, zero),
                   coef_uniform=token * (eps / canon.vocab_size) if eps else None)


def empty_shard_stats(n: int, device, *, logit_sum: bool) -> ShardStats:
    """Statistics of a shard with no rows: it holds no logit, no target and no set id (`logit_sum`: with
    label smoothing, its sum of logits, 0)."""
    neg = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    zero = torch.zeros(n, dtype=torch.float32, device=device)
    return ShardStats(max=neg, argmax=torch.zeros(n, dtype=torch.int64, device=device), lse=neg.clone(),
                      target_logit=zero, set_lse=neg.clone(), soft_dot=zero.clone(),
                      logit_sum=zero.clone() if logit_sum else None)
