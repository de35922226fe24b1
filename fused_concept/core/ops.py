"""The single-device fused loss as two registered torch ops, so that torch.compile sees one op per pass.

    fused_concept::loss_forward    canonical rows + head -> loss, lse, ce, mass, argmax, set_lse, hinge,
                                   and d_hidden, d_weight, d_bias when the `fuse_*` flags ask for them
                                   (the gradient of a summed loss, formed during the forward sweep)
    fused_concept::loss_backward   the same inputs + saved lse, set_lse, hinge + the upstream gradient
                                   per row -> d_hidden, d_weight, d_bias (logits recomputed)

Both run a backend of `_backends` (torch on any device, Triton on CUDA or under the interpreter). Each has a
fake implementation (output shapes and dtypes from the input shapes, for tracing) and the forward has an
autograd formula, so Dynamo traces a call without graph breaks and Inductor keeps it as one opaque node whose
body runs eagerly. Gradients that are not computed come back as empty tensors (an op returns tensors only).

An op's schema is flat (tensors and scalars): `_flat(canon)` spells a `Canonical` out as op arguments and
`_canonical(...)` builds it back; `kernel_options` travel as the repr of a sorted tuple of pairs.
"""
from __future__ import annotations

import ast
from typing import Optional

import torch
from torch import Tensor

from fused_concept.core import dispatch
from fused_concept.core.inputs import Canonical
from fused_concept.core.outputs import ConceptStats
from fused_concept.core.rowmath import (Needs, ShardGrads, acc_dtype, grad_coefficients, reduce_rows, row_terms,
                                         upstream_per_row)

# Canonical fields as op arguments, in order: 11 tensors (3 optional) then 6 scalars
_TENSOR_FIELDS = ("hidden", "weight", "bias", "targets", "valid", "set_ids", "has_set", "soft_ids", "soft_weights",
                  "ntp_weight", "concept_weight")
_SCALAR_FIELDS = ("softcap", "margin", "z_loss", "label_smoothing", "vocab_start", "vocab_size")
_CANON_ARGS = len(_TENSOR_FIELDS) + len(_SCALAR_FIELDS)


def _flat(canon: Canonical) -> tuple:
    return tuple(getattr(canon, f) for f in _TENSOR_FIELDS + _SCALAR_FIELDS)


def _canonical(args) -> Canonical:
    fields = dict(zip(_TENSOR_FIELDS + _SCALAR_FIELDS, args))
    return Canonical(**fields, lead_shape=torch.Size([fields["hidden"].shape[0]]))


def _encode(options: dict) -> str:
    return repr(tuple(sorted(options.items())))


def _decode(options: str) -> dict:
    return dict(ast.literal_eval(options))


def _grad_outputs(grads: ShardGrads, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """The three gradient outputs in the inputs' dtypes; an empty tensor where none was computed."""
    out = []
    for g, like in zip(grads, (hidden, weight, bias)):
        out.append(hidden.new_empty(0) if g is None else g.to(like.dtype))
    return tuple(out)


def _fake_grads(hidden, weight, bias, wants):
    likes = (hidden, weight, bias)
    return tuple(like.new_empty(like.shape) if want else hidden.new_empty(0) for like, want in zip(likes, wants))


# ------------------------------------------------------------------------------------------ forward


@torch.library.custom_op("fused_concept::loss_forward", mutates_args=())
def _loss_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, valid: Tensor, set_ids: Tensor,
    has_set: Tensor, soft_ids: Optional[Tensor], soft_weights: Optional[Tensor], ntp_weight: Tensor,
    concept_weight: Tensor, softcap: Optional[float], margin: Optional[float], z_loss: float, label_smoothing: float,
    vocab_start: int, vocab_size: int,
    backend: str, reduction: str, kernel_options: str, fuse_hidden: bool, fuse_weight: bool, fuse_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    canon = _canonical((hidden, weight, bias, targets, valid, set_ids, has_set, soft_ids, soft_weights, ntp_weight,
                        concept_weight, softcap, margin, z_loss, label_smoothing, vocab_start, vocab_size))
    chosen = dispatch.get(backend)
    needs = Needs(fuse_hidden, fuse_weight, fuse_bias)
    if needs.any:
        scale = upstream_per_row(torch.ones((), device=hidden.device), valid, reduction)
        stats, grads = chosen.stats_and_grads(canon, row_scale=scale, needs=needs, options=_decode(kernel_options))
    else:
        stats, grads = chosen.partial_stats(canon), ShardGrads(None, None, None)
    terms = row_terms(stats, canon)
    loss = reduce_rows(terms.loss, valid, reduction)
    return (loss, stats.lse, terms.ce, terms.mass, stats.argmax, stats.set_lse, terms.hinge,
            *_grad_outputs(grads, hidden, weight, bias))


@_loss_forward.register_fake
def _(*args):
    hidden, weight, bias = args[:3]
    backend, reduction, kernel_options, fuse_hidden, fuse_weight, fuse_bias = args[_CANON_ARGS:]
    n = hidden.shape[0]
    rows = hidden.new_empty(n, dtype=acc_dtype(hidden))
    loss = rows.new_empty(n) if reduction == "none" else rows.new_empty(())
    return (loss, rows.new_empty(n), rows.new_empty(n), rows.new_empty(n), hidden.new_empty(n, dtype=torch.int64),
            rows.new_empty(n), rows.new_empty(n), *_fake_grads(hidden, weight, bias, (fuse_hidden, fuse_weight, fuse_bias)))


# ------------------------------------------------------------------------------------------ backward


@torch.library.custom_op("fused_concept::loss_backward", mutates_args=())
def _loss_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, valid: Tensor, set_ids: Tensor,
    has_set: Tensor, soft_ids: Optional[Tensor], soft_weights: Optional[Tensor], ntp_weight: Tensor,
    concept_weight: Tensor, softcap: Optional[float], margin: Optional[float], z_loss: float, label_smoothing: float,
    vocab_start: int, vocab_size: int,
    lse: Tensor, set_lse: Tensor, hinge: Tensor, grad_rows: Tensor,
    backend: str, kernel_options: str, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    canon = _canonical((hidden, weight, bias, targets, valid, set_ids, has_set, soft_ids, soft_weights, ntp_weight,
                        concept_weight, softcap, margin, z_loss, label_smoothing, vocab_start, vocab_size))
    grad = grad_coefficients(grad_rows, canon, lse=lse, set_lse=set_lse, hinge=hinge)
    needs = Needs(need_hidden, need_weight, need_bias and bias is not None)
    grads = dispatch.get(backend).shard_grads(canon, grad, needs, _decode(kernel_options))
    return _grad_outputs(grads, hidden, weight, bias)


@_loss_backward.register_fake
def _(*args):
    hidden, weight, bias = args[:3]
    need_hidden, need_weight, need_bias = args[-3:]
    return _fake_grads(hidden, weight, bias, (need_hidden, need_weight, need_bias and bias is not None))


# ------------------------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    canon_args, (backend, reduction, kernel_options, *fused) = inputs[:_CANON_ARGS], inputs[_CANON_ARGS:]
    lse, set_lse, hinge = output[1], output[5], output[6]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*canon_args[: len(_TENSOR_FIELDS)], lse, set_lse, hinge)
    ctx.scalars = canon_args[len(_TENSOR_FIELDS):]
    ctx.backend, ctx.reduction, ctx.kernel_options = backend, reduction, kernel_options
    # the fused gradient is a plain attribute (not a saved tensor) so that the first backward can hand its
    # buffers over to .grad without a copy; a second backward (retain_graph) recomputes
    ctx.grads = output[7:] if any(fused) else None


def _scaled(grads, grad_loss: Tensor):
    """The fused gradient (of the loss with upstream 1) times the upstream scalar. Eager: in place, no copy
    of d_weight, and skipped for the usual plain CPU 1 (where looking costs nothing; on CUDA it would be a
    device sync). Traced (fake or functional tensors): out of place, and the compiler plans the buffers."""
    if type(grad_loss) is not Tensor:
        return tuple(g * grad_loss.to(g.dtype) for g in grads)
    if grad_loss.device.type == "cpu" and bool(grad_loss == 1):
        return grads
    return tuple(g.mul_(grad_loss.to(g.dtype)) for g in grads)


@torch.autograd.function.once_differentiable
def _backward(ctx, grad_loss, *_non_differentiable):
    wants = ctx.needs_input_grad[:3]
    if grad_loss is None:  # no gradient reached the loss (only a non-differentiable output was used)
        return (None,) * len(ctx.needs_input_grad)
    if ctx.grads is not None:
        grads, ctx.grads = ctx.grads, None
        grads = _scaled(grads, grad_loss)
    else:
        *canon_tensors, lse, set_lse, hinge = ctx.saved_tensors
        valid = canon_tensors[_TENSOR_FIELDS.index("valid")]
        grad_rows = upstream_per_row(grad_loss, valid, ctx.reduction)
        grads = torch.ops.fused_concept.loss_backward(*canon_tensors, *ctx.scalars, lse, set_lse, hinge, grad_rows,
                                                      ctx.backend, ctx.kernel_options, *wants)
    return (*(g if want else None for g, want in zip(grads, wants)), *(None,) * (len(ctx.needs_input_grad) - 3))


_loss_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ entry


def fused_loss(canon: Canonical, backend: str, reduction: str, kernel_options: dict):
    """(loss, flat ConceptStats) of `canon` on the named backend, through the registered ops. Where the backend
    can and a gradient is wanted, the forward forms the gradient of a summed / mean loss as it sweeps."""
    grad_mode = torch.is_grad_enabled()
    needs = Needs(hidden=grad_mode and canon.hidden.requires_grad, weight=grad_mode and canon.weight.requires_grad,
                  bias=grad_mode and canon.bias is not None and canon.bias.requires_grad)
    fuse = dispatch.get(backend).fuses(kernel_options) and reduction != "none" and needs.any
    loss, lse, ce, mass, argmax, *_ = torch.ops.fused_concept.loss_forward(
        *_flat(canon), backend, reduction, _encode(kernel_options), *(needs if fuse else (False, False, False)))
    return loss, ConceptStats(lse, ce, mass, argmax)
