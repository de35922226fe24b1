"""The front door: `concept_loss`, `concept_objective` and the `ConceptLoss` module.

Implementations (`impl=`):
  "reference"  float32 logits [N, V] in memory, autograd through them (the naive loss, the oracle)
  "torch"      chunked plain PyTorch; one chunk of logits alive at a time (any device)
  "triton"     fused Triton kernels; logits never stored (CUDA, or the Triton interpreter)
  "auto"       "triton" for CUDA tensors when Triton is importable, else "torch"
"""
from __future__ import annotations

import importlib.util
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import _torch_path
from ._inputs import Canonical, prepare
from ._objective import objective_loss_options
from ._reference import reference_rows
from ._rowmath import grad_coefficients, reduce_rows, row_terms, upstream_per_row

IMPLS = ("auto", "reference", "torch", "triton")
KERNEL_OPTIONS = ("deterministic", "filter_eps", "weight_pass", "vocab_splits", "chunk_columns")


class ConceptStats(NamedTuple):
    """Per-row statistics, shaped like `targets`. `ce` is 0 on ignored rows; `mass` (probability of
    the concept set) is 0 on rows whose concepts list no id; `lse` and `argmax` cover every row."""

    lse: Tensor
    ce: Tensor
    mass: Tensor
    argmax: Tensor


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "triton" if device.type == "cuda" and _triton_available() else "torch"


class _Backend(NamedTuple):
    partial_stats: object
    shard_grads: object


def _backend(impl: str) -> _Backend:
    if impl == "triton":
        from . import _triton_path

        return _Backend(_triton_path.triton_partial_stats, _triton_path.triton_shard_grads)
    return _Backend(_torch_path.torch_partial_stats, _torch_path.torch_shard_grads)


class _FusedConceptLoss(torch.autograd.Function):
    """Loss and statistics from one sweep over the vocabulary; logits are never kept.

    With reduction "sum"/"mean" on the torch path, the gradient is formed during the forward sweep
    (the loss is linear in the upstream scalar) and the backward only scales it. Otherwise (or for
    "none") the backward recomputes the logits chunk by chunk / tile by tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, canon: Canonical, impl, reduction, margin, softcap, z_loss,
                kernel_options, grad_mode):
        # needs_input_grad ignores torch.no_grad(); grad_mode is what concept_loss saw outside forward
        needs = [need and grad_mode for need in ctx.needs_input_grad]
        need_hidden, need_weight, need_bias = needs[0], needs[1], bias is not None and needs[2]
        any_grad = need_hidden or need_weight or need_bias
        fuse = impl == "torch" and any_grad and reduction != "none"
        if fuse:
            scale = torch.ones_like(canon.alpha)
            if reduction == "mean":
                scale = scale / canon.valid.sum().clamp(min=1).float()
            stats, grads = _torch_path.torch_stats_and_grads(
                canon, softcap=softcap, margin=margin, z_loss=z_loss, row_scale=scale,
                need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
        else:
            stats = _backend(impl).partial_stats(canon.hidden, canon.weight, canon.bias, canon.targets,
                                                 canon.set_ids, canon.soft_ids, canon.soft_weights,
                                                 vocab_start=0, softcap=softcap)
            grads = None
        terms = row_terms(stats, valid=canon.valid, has_set=canon.has_set, alpha=canon.alpha,
                          beta=canon.beta, margin=margin, z_loss=z_loss, soft=canon.soft)
        loss = reduce_rows(terms.loss, canon.valid, reduction)
        ctx.impl, ctx.reduction, ctx.softcap, ctx.z_loss = impl, reduction, softcap, z_loss
        ctx.kernel_options = kernel_options
        ctx.canon = canon
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.need = (need_hidden, need_weight, need_bias)
        # the fused gradient is kept as a plain attribute (not saved tensors) so that the first backward
        # can hand the buffers over to .grad without a copy; a repeated backward (retain_graph) recomputes
        ctx.grads = grads
        ctx.save_for_backward(stats.lse, stats.set_lse, terms.hinge)
        ctx.mark_non_differentiable(terms.ce, terms.mass, stats.lse, stats.argmax)
        return loss, stats.lse, terms.ce, terms.mass, stats.argmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_unused):
        need_hidden, need_weight, need_bias = ctx.need
        canon = ctx.canon
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            if bool(grad_loss != 1):
                grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        else:
            lse, set_lse, hinge = ctx.saved_tensors
            g = upstream_per_row(grad_loss, canon.valid, ctx.reduction)
            coefs = grad_coefficients(g, lse=lse, hinge=hinge, valid=canon.valid, has_set=canon.has_set,
                                      alpha=canon.alpha, beta=canon.beta, z_loss=ctx.z_loss)
            grads = _backend(ctx.impl).shard_grads(
                canon.hidden, canon.weight, canon.bias, canon.targets, canon.set_ids, canon.soft_ids,
                canon.soft_weights, vocab_start=0, softcap=ctx.softcap, lse=lse, set_lse=set_lse,
                coef_dense=coefs[0], coef_target=coefs[1], coef_set=coefs[2], need_hidden=need_hidden,
                need_weight=need_weight, need_bias=need_bias, **ctx.kernel_options)
        out = [None if gr is None or not need else gr.to(dt)
               for gr, need, dt in zip(grads, ctx.need, ctx.dtypes)]
        return out[0], out[1], out[2], None, None, None, None, None, None, None, None


def concept_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    concepts: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    ntp_weight=1.0,
    concept_weight=1.0,
    margin: Optional[float] = None,
    mode: str = "marginal",
    concept_probs: Optional[Tensor] = None,
    include_target: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    impl: str = "auto",
    return_stats: bool = False,
    kernel_options: Optional[dict] = None,
):
    """Next-token cross-entropy mixed with the concept loss, from hidden states and the LM head.

    Row i (leading dims of `hidden` flattened) has logits z_i = W h_i + b, optionally soft-capped
    as softcap * tanh(z / softcap), and loss

        loss_i = ntp_weight_i * ce_i + concept_weight_i * cl_i + z_loss * lse_i^2,
        ce_i   = lse_i - z_{i, y_i},
        cl_i   = -log(sum_{t in S_i} softmax(z_i)_t)                 (mode="marginal")
               = lse_i - sum_k concept_probs_ik z_{i, C_ik}           (mode="soft"),

    where S_i holds the row's concept ids (-1 pads, duplicates counted once) plus the gold id when
    `include_target`. A row whose concepts list no id has no concept term. With `margin=m`, cl_i
    counts only while the set's mass is below m (the indicator carries no gradient). Rows whose
    target is `ignore_index` count nowhere; "mean" divides by the number of the other rows.

    Args:
        hidden: [..., D] float32 / bfloat16 / float16.
        weight: [V, D], the dtype of hidden. bias: [V] or None.
        targets: integer ids shaped like hidden's leading dims.
        concepts: [..., K] integer ids, -1 padded, or None (plain cross-entropy).
        ntp_weight, concept_weight: floats or tensors shaped like targets (no gradient).
        impl: "auto" | "reference" | "torch" | "triton".
        return_stats: also return `ConceptStats(lse, ce, mass, argmax)`, shaped like targets.
        kernel_options: Triton backward switches (impl "triton" only): `deterministic` (default True:
            no atomics, bitwise-repeatable), `filter_eps` (skip gradient tiles whose softmax values
            are all below it; default 0 = off), `weight_pass` ("chunked" | "sweep"); see kernels/README.md.

    Returns:
        the loss (a scalar, or per-row shaped like targets for reduction="none"), and the stats when asked.
    """
    canon = prepare(hidden, weight, targets, concepts, bias=bias, ntp_weight=ntp_weight,
                    concept_weight=concept_weight, margin=margin, mode=mode, concept_probs=concept_probs,
                    include_target=include_target, ignore_index=ignore_index, reduction=reduction,
                    softcap=softcap, z_loss=z_loss)
    which = _resolve_impl(impl, hidden.device)
    if which == "triton" and hidden.device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError('impl="triton" needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)')
    kernel_options = dict(kernel_options or {})
    unknown = set(kernel_options) - set(KERNEL_OPTIONS)
    if unknown:
        raise ValueError(f"unknown kernel_options {sorted(unknown)}; known: {list(KERNEL_OPTIONS)}")
    if kernel_options and which != "triton":
        raise ValueError(f'kernel_options apply to impl="triton" only, but impl resolved to {which!r}')
    if which == "reference":
        stats, terms = reference_rows(canon, softcap=softcap, margin=margin, z_loss=z_loss)
        loss = reduce_rows(terms.loss, canon.valid, reduction)
        lse, ce, mass, argmax = stats.lse.detach(), terms.ce.detach(), terms.mass.detach(), stats.argmax
    else:
        loss, lse, ce, mass, argmax = _FusedConceptLoss.apply(
            canon.hidden, weight, bias, canon, which, reduction, margin, softcap, float(z_loss), kernel_options,
            torch.is_grad_enabled())
    shape = canon.lead_shape
    if reduction == "none":
        loss = loss.reshape(shape)
    if not return_stats:
        return loss
    return loss, ConceptStats(lse.reshape(shape), ce.reshape(shape), mass.reshape(shape), argmax.reshape(shape))


def concept_objective(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    concepts: Tensor,
    *,
    lam: float = 0.5,
    margin: Optional[float] = 0.6,
    ignore_index: int = -100,
    impl: str = "auto",
    num_valid=None,
    num_content=None,
    **options,
):
    """The paper's training objective (Zhang, Jurafsky, Shani 2026):

        L = (1/N_v) [ sum_{valid, not content} ce_i + (1 - lam) sum_{content} ce_i ] + lam * mean_{content} cl_i

    with content rows = valid rows whose concepts list at least one id, the gold id in every set and
    the hinge at `margin`. `num_valid` / `num_content` replace the local counts N_v and |T| (pass
    global counts under gradient accumulation or data parallelism). Other keyword options go to
    `concept_loss` (bias, softcap, z_loss, return_stats, ...)."""
    loss_options = objective_loss_options("concept_objective", "concept_loss", targets, concepts, lam=lam,
                                          margin=margin, ignore_index=ignore_index, num_valid=num_valid,
                                          num_content=num_content, options=options)
    return concept_loss(hidden, weight, targets, concepts, impl=impl, **loss_options)


class ConceptLoss(nn.Module):
    """Module form of `concept_loss`: options are fixed at construction,
    `forward(hidden, weight, targets, concepts=None, bias=None)`."""

    def __init__(self, *, ntp_weight=1.0, concept_weight=1.0, margin=None, mode="marginal",
                 include_target=True, ignore_index=-100, reduction="mean", softcap=None, z_loss=0.0,
                 impl="auto", return_stats=False, kernel_options=None):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.options = dict(ntp_weight=ntp_weight, concept_weight=concept_weight, margin=margin, mode=mode,
                            include_target=include_target, ignore_index=ignore_index, reduction=reduction,
                            softcap=softcap, z_loss=z_loss, impl=impl, return_stats=return_stats,
                            kernel_options=kernel_options)

    def forward(self, hidden, weight, targets, concepts=None, bias=None, concept_probs=None):
        return concept_loss(hidden, weight, targets, concepts, bias=bias, concept_probs=concept_probs,
                            **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
