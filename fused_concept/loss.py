"""The front door: `concept_loss`, `concept_objective` and the `ConceptLoss` module.

Implementations (`impl=`):
  "reference"  float32 logits [N, V] in memory, autograd through them (the naive loss, the oracle)
  "torch"      chunked plain PyTorch; one chunk of logits alive at a time (any device)
  "triton"     fused Triton kernels; logits never stored (CUDA, or the Triton interpreter)
  "auto"       "torch" (measured faster than "triton" on an H200 in every class tried; see
               dispatch.resolve), or "triton" when kernel_options are given and Triton can run
"""
from __future__ import annotations

import sys
from typing import Optional

from torch import Tensor, nn

from fused_concept import backends  # noqa: F401  (registers the backends with the seam)
from fused_concept.core import dispatch
from fused_concept.core.dispatch import IMPLS
from fused_concept.core.inputs import Canonical, prepare
from fused_concept.core.objective import objective_options
from fused_concept.core.ops import fused_loss
from fused_concept.core.options import FIELDS as LOSS_FIELDS
from fused_concept.core.options import LossOptions
from fused_concept.core.outputs import ConceptStats, finish
from fused_concept.core.reference import reference_rows
from fused_concept.core.rowmath import reduce_rows


def concept_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    concepts: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    concept_probs: Optional[Tensor] = None,
    ntp_weight=1.0,
    concept_weight=1.0,
    margin: Optional[float] = None,
    mode: str = "marginal",
    include_target: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    shift: bool = False,
    impl: str = "auto",
    return_stats: bool = False,
    kernel_options: Optional[dict] = None,
):
    """Next-token cross-entropy mixed with the concept loss, from hidden states and the LM head.

    Row i (leading dims of `hidden` flattened) has logits z_i = W h_i + b, optionally soft-capped
    as softcap * tanh(z / softcap), and loss

        loss_i = ntp_weight_i * ce_i + concept_weight_i * cl_i + z_loss * lse_i^2,
        ce_i   = lse_i - z_{i, y_i}      (with label_smoothing eps: lse_i - (1 - eps) z_{i, y_i} - eps mean_v z_iv)
        cl_i   = -log(sum_{t in S_i} softmax(z_i)_t)                 (mode="marginal")
               = lse_i - sum_k concept_probs_ik z_{i, C_ik}           (mode="soft"),

    where S_i holds the row's concept ids (-1 pads, duplicates counted once) plus the gold id when
    `include_target`. A row whose concepts list no id has no concept term. With `margin=m` (in (0, 1]),
    cl_i counts only while the set's mass is below m (the indicator carries no gradient). Rows whose
    target is `ignore_index` count nowhere; "mean" divides by the number of the other rows.

    Args:
        hidden: [..., D] float32 / bfloat16 / float16.
        weight: [V, D], the dtype of hidden. bias: [V] or None.
        targets: integer ids shaped like hidden's leading dims.
        concepts: [..., K] integer ids, -1 padded, or None (plain cross-entropy).
        concept_probs: [..., K] weights of the concept ids (mode="soft").
        ntp_weight, concept_weight: floats or tensors shaped like targets (no gradient).
        label_smoothing: eps in [0, 1] for the token term, as torch.nn.CrossEntropyLoss(label_smoothing=eps).
        shift: hidden, targets and concepts are unshifted (aligned with the input tokens): position t
            predicts targets[..., t + 1] (the last leading dim is the sequence); only the small id tensors
            are shifted, never hidden, and the outputs drop the last position.
        impl: "auto" | "reference" | "torch" | "triton".
        return_stats: also return `ConceptStats(lse, ce, mass, argmax)`, shaped like targets (ce is the gold
            NLL, without label smoothing; token accuracy is `stats.argmax == targets`).
        kernel_options: Triton switches (impl "triton", or "auto", which they make "triton"): `strategy`
            ("recompute", the default: the backward recomputes the logits, least memory; "rows": row chunks
            of logits on cuBLAS, the gradient formed in the forward, 6 N D V flops, with `chunk_mib` /
            `chunk_rows` and `weight_accum` ("float32" | "weight"); "recompute_sweep"); for the recompute
            strategies `deterministic` (default True: no atomics, bitwise-repeatable) and `filter_eps`
            (skip gradient tiles whose softmax values are all below it; default "auto" = off); see
            kernels/README.md.

    Returns:
        the loss (a scalar, or per-row shaped like targets for reduction="none"), and the stats when asked.
    """
    options = LossOptions(ntp_weight=ntp_weight, concept_weight=concept_weight, margin=margin, mode=mode,
                          include_target=include_target, ignore_index=ignore_index, reduction=reduction,
                          softcap=softcap, z_loss=z_loss, label_smoothing=label_smoothing, shift=shift)
    return loss_with_options(hidden, weight, targets, concepts, bias=bias, concept_probs=concept_probs,
                             options=options, impl=impl, return_stats=return_stats, kernel_options=kernel_options)


def loss_with_options(hidden: Tensor, weight: Tensor, targets: Tensor, concepts: Optional[Tensor], *,
                      bias: Optional[Tensor], concept_probs: Optional[Tensor], options: LossOptions, impl: str,
                      return_stats: bool, kernel_options: Optional[dict]):
    """`concept_loss` with its loss keywords as one `LossOptions` (what the objective, the module and the
    fused head call)."""
    if _has_dtensor(hidden, weight, bias):
        if kernel_options:
            raise ValueError("kernel_options are not supported with a DTensor (tensor-parallel) head")
        from fused_concept.parallel.tensor import tensor_parallel_loss

        return tensor_parallel_loss(hidden, weight, targets, concepts, bias=bias, concept_probs=concept_probs,
                                    options=options, impl=impl, return_stats=return_stats)
    canon = prepare(hidden, weight, targets, concepts, bias=bias, concept_probs=concept_probs, options=options)
    which = dispatch.resolve(impl, hidden.device, kernel_options=kernel_options)
    checked = dispatch.check_kernel_options(which, kernel_options)
    if which == "reference":
        loss, stats = _reference_loss(canon, options.reduction)
    else:
        loss, stats = fused_loss(canon, which, options.reduction, checked)
    return finish(loss, stats, canon, reduction=options.reduction, return_stats=return_stats)


def _reference_loss(canon: Canonical, reduction: str):
    stats, terms = reference_rows(canon)
    loss = reduce_rows(terms.loss, canon.valid, reduction)
    return loss, ConceptStats(stats.lse.detach(), terms.ce.detach(), terms.mass.detach(), stats.argmax)


def _has_dtensor(*tensors) -> bool:
    tensor_module = sys.modules.get("torch.distributed.tensor")  # never imported here just to look
    return tensor_module is not None and any(isinstance(t, tensor_module.DTensor) for t in tensors)


def concept_objective(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    concepts: Tensor,
    *,
    lam: float = 0.5,
    margin: Optional[float] = 0.6,
    ignore_index: int = -100,
    num_valid=None,
    num_content=None,
    bias: Optional[Tensor] = None,
    impl: str = "auto",
    return_stats: bool = False,
    kernel_options: Optional[dict] = None,
    **options,
):
    """The paper's training objective (Zhang, Jurafsky, Shani 2026):

        L = (1/N_v) [ sum_{valid, not content} ce_i + (1 - lam) sum_{content} ce_i ] + lam * mean_{content} cl_i

    with content rows = valid rows whose concepts list at least one id (`content_rows`), the gold id in
    every set and the hinge at `margin`. `num_valid` / `num_content` replace the local counts N_v and |T|
    (pass global counts under gradient accumulation or data parallelism). Other keyword options are
    `concept_loss`'s (softcap, z_loss, label_smoothing, shift, ...)."""
    loss_options = objective_options("concept_objective", "concept_loss", targets, concepts, lam=lam, margin=margin,
                                     ignore_index=ignore_index, num_valid=num_valid, num_content=num_content,
                                     options=options)
    return loss_with_options(hidden, weight, targets, concepts, bias=bias, concept_probs=None, options=loss_options,
                             impl=impl, return_stats=return_stats, kernel_options=kernel_options)


class ConceptLoss(nn.Module):
    """Module form of `concept_loss`: the loss keywords (`LossOptions`' fields) and `impl`, `return_stats`,
    `kernel_options` are fixed at construction; `forward(hidden, weight, targets, concepts=None, bias=None,
    concept_probs=None)`."""

    def __init__(self, *, impl: str = "auto", return_stats: bool = False, kernel_options: Optional[dict] = None,
                 **options):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.options = LossOptions(**options)
        self.impl, self.return_stats, self.kernel_options = impl, return_stats, kernel_options

    def forward(self, hidden, weight, targets, concepts=None, bias=None, concept_probs=None):
        return loss_with_options(hidden, weight, targets, concepts, bias=bias, concept_probs=concept_probs,
                                 options=self.options, impl=self.impl, return_stats=self.return_stats,
                                 kernel_options=self.kernel_options)

    def extra_repr(self) -> str:
        shown = {name: getattr(self.options, name) for name in LOSS_FIELDS}
        shown.update(impl=self.impl, return_stats=self.return_stats, kernel_options=self.kernel_options)
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())
