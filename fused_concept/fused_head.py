"""The training loss computed inside the LM head module's own forward.

A sharded training stack only gathers a module's parameters when that module is called: FSDP2's
``fully_shard`` unshards the weight in the module's forward pre-hook, and reduce-scatters its gradient
after the module's backward. A model that hands ``self.head.weight`` to the fused loss never calls the head,
so the loss would see the sharded weight. :func:`fuse_head` gives the head module a forward that computes
the loss from its own (gathered) weight:

    fuse_head(model.head, lam=0.5, margin=0.6)           # once, before or after fully_shard
    loss = model.head(hidden, targets, concepts)          # the paper's objective, in head.forward
    logits = model.head(hidden)                           # without targets: the module's own forward

:func:`training_loss` is that loss, shared with ``fused_concept.hf.patch`` (whose causal-LM forward calls
the fused head in the same way): with concepts the paper's objective (``concept_objective``; with
``mode="soft"`` or ``include_target=False``, its per-row weights around ``concept_loss``), without concepts
the fused cross-entropy (mean, or sum / ``num_items_in_batch``).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import Tensor

from fused_concept.head import Head
from fused_concept.core.inputs import content_rows
from fused_concept.core.objective import paper_weights

LOSS_OPTIONS = frozenset({"lam", "margin", "impl", "z_loss", "ignore_index", "include_target", "mode"})
_FLAG = "_fused_concept_head"


def check_loss_options(caller: str, options: dict) -> None:
    unknown = set(options) - LOSS_OPTIONS
    if unknown:
        raise TypeError(f"{caller}() got unknown loss options {sorted(unknown)}; known: {sorted(LOSS_OPTIONS)}")


def _content_estimate(targets: Tensor, concepts: Tensor, ignore_index: int, num_items_in_batch):
    """|T| over the whole accumulated batch when only its valid-row count is known: this batch's content
    rows scaled by num_items_in_batch / this batch's valid rows (exact when every micro-batch has the same
    share of content rows; pass num_content for the exact count)."""
    valid = targets != ignore_index
    content = content_rows(targets, concepts, ignore_index).sum()
    return content * torch.as_tensor(num_items_in_batch, device=targets.device) / valid.sum().clamp(min=1)


def training_loss(hidden: Tensor, head: Head, targets: Tensor, concepts: Optional[Tensor] = None,
                  concept_probs: Optional[Tensor] = None, *, num_items_in_batch=None, num_content=None,
                  options: dict) -> Tensor:
    """The training loss of rows ``hidden`` [..., D] against ``head`` (module docstring). ``num_items_in_batch``
    (valid rows of the whole accumulated / data-parallel batch) replaces the local count N_v and
    ``num_content`` the local |T| (estimated from num_items_in_batch when not given)."""
    from fused_concept.loss import concept_loss, concept_objective

    options = dict(options)
    hidden, bias = head.fold(hidden)
    ignore_index = options.pop("ignore_index", -100)
    common = dict(bias=bias, softcap=head.softcap, impl=options.pop("impl", "auto"),
                  z_loss=options.pop("z_loss", 0.0), ignore_index=ignore_index)
    if concepts is None:
        if concept_probs is not None:
            raise ValueError("concept_probs were given without concepts")
        if num_items_in_batch is None:
            return concept_loss(hidden, head.weight, targets, reduction="mean", **common)
        loss = concept_loss(hidden, head.weight, targets, reduction="sum", **common)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    lam, margin = options.pop("lam", 0.5), options.pop("margin", 0.6)
    if concept_probs is not None and options.setdefault("mode", "soft") != "soft":
        raise ValueError(f'concept_probs need mode="soft", but the model was patched with mode={options["mode"]!r}')
    if num_content is None and num_items_in_batch is not None:
        num_content = _content_estimate(targets, concepts, ignore_index, num_items_in_batch)
    if not options:
        return concept_objective(hidden, head.weight, targets, concepts, lam=lam, margin=margin,
                                 num_valid=num_items_in_batch, num_content=num_content, **common)
    # soft mode or include_target=False: the paper's weights around concept_loss
    ntp_weight, concept_weight = paper_weights(targets, concepts, lam, ignore_index, num_valid=num_items_in_batch,
                                               num_content=num_content)
    return concept_loss(hidden, head.weight, targets, concepts, ntp_weight=ntp_weight.reshape(targets.shape),
                        concept_weight=concept_weight.reshape(targets.shape), margin=margin,
                        concept_probs=concept_probs, reduction="sum", **common, **options)


def is_fused(module) -> bool:
    return _FLAG in vars(module)


def fuse_head(module, *, scale: float = 1.0, softcap: Optional[float] = None, rows: Optional[int] = None,
              **loss_options):
    """Give the head ``module`` (any module with ``weight`` [V, D] and optional ``bias`` [V], e.g. an
    ``nn.Linear``) a forward that computes the training loss from its own weight; returns ``module``.

    Afterwards ``module(hidden, targets, concepts=None, *, concept_probs=None, num_items_in_batch=None,
    num_content=None)`` returns the loss of :func:`training_loss` on the logits
    ``softcap * tanh(scale * (W h + b) / softcap)`` of the first ``rows`` rows of the head (all when None),
    while ``module(hidden)`` is the module's own forward. ``loss_options``: lam, margin, impl, z_loss, ignore_index,
    include_target, mode. Works before or after FSDP2's ``fully_shard`` and under torch.compile;
    :func:`unfuse_head` undoes it."""
    check_loss_options("fuse_head", loss_options)
    Head.of_module(module)  # fail now, not at the first forward
    unfuse_head(module)
    vars(module)[_FLAG] = dict(forward=module.forward, had_instance_forward="forward" in vars(module),
                               head=dict(scale=float(scale), softcap=softcap, rows=rows), options=loss_options)
    module.forward = types.MethodType(_fused_forward, module)
    return module


def unfuse_head(module):
    """Undo :func:`fuse_head`; returns ``module`` (unchanged when it is not fused)."""
    state = vars(module).pop(_FLAG, None)
    if state is not None:
        if state["had_instance_forward"]:
            module.forward = state["forward"]
        else:
            del module.forward
    return module


def model_logits(module, hidden: Tensor) -> Tensor:
    """The logits of fused head ``module`` (its first ``rows`` rows, scaled and capped) from its own forward,
    so that FSDP2 gathers the weight as for any call."""
    head = vars(module)[_FLAG]["head"]
    raw = module(hidden)
    if head["rows"] is not None:
        raw = raw[..., : head["rows"]]
    return Head.of_module(module, **head).capped(raw)


def _fused_forward(self, hidden, targets=None, concepts=None, *, concept_probs=None, num_items_in_batch=None,
                   num_content=None, **kwargs):
    state = vars(self)[_FLAG]
    if targets is None:
        if concepts is not None:
            raise ValueError("concepts were given without targets; pass targets too")
        return state["forward"](hidden, **kwargs)
    if kwargs:
        raise TypeError(f"the fused head got unexpected keyword arguments {sorted(kwargs)}")
    head = Head.of_module(self, **state["head"])
    return training_loss(hidden, head, targets, concepts, concept_probs, num_items_in_batch=num_items_in_batch,
                         num_content=num_content, options=state["options"])
