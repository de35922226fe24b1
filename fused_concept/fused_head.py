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
the fused head in the same way): with concepts the paper's objective (its per-row weights,
``core.objective.paper_options``, around ``concept_loss``; ``mode="soft"`` and ``include_target=False`` allowed),
without concepts the fused cross-entropy (mean, or sum / ``num_items_in_batch``). :class:`TrainingLoss` holds its
settings.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from fused_concept.core.dispatch import IMPLS
from fused_concept.core.inputs import content_rows
from fused_concept.core.objective import paper_options
from fused_concept.core.options import FIELDS as LOSS_FIELDS
from fused_concept.core.options import LossOptions
from fused_concept.head import Head
from fused_concept.loss import loss_with_options

_FLAG = "_fused_concept_head"
# set per call (from the objective, or from the head itself), never by the user
_NOT_SETTABLE = ("ntp_weight", "concept_weight", "reduction", "softcap")


@dataclass(frozen=True)
class TrainingLoss:
    """What a fused head computes: the paper's objective with `lam` and `margin` when concepts are given, plain
    cross-entropy otherwise, on `impl`; `mode` None means "soft" exactly when concept_probs are given. `loss`
    carries the other loss keywords (ignore_index, include_target, z_loss, label_smoothing, shift)."""

    lam: float = 0.5
    margin: Optional[float] = 0.6
    impl: str = "auto"
    mode: Optional[str] = None
    loss: LossOptions = field(default_factory=LossOptions)

    @classmethod
    def of(cls, caller: str, keywords: dict) -> "TrainingLoss":
        """From the keywords of `fuse_head` / `hf.patch`, checked now (not at the first forward)."""
        keywords = dict(keywords)
        fixed = sorted(set(keywords) & set(_NOT_SETTABLE))
        if fixed:
            raise TypeError(f"{caller}() sets {fixed} itself (the objective's row weights, its reduction and the "
                            "head's softcap); pass lam / margin and the other loss options")
        known = set(LOSS_FIELDS) | {"lam", "margin", "impl"}
        unknown = sorted(set(keywords) - known)
        if unknown:
            settable = sorted(known - set(_NOT_SETTABLE))
            raise TypeError(f"{caller}() got unknown loss options {unknown}; known: {settable}")
        spec = cls(lam=keywords.pop("lam", 0.5), margin=keywords.pop("margin", 0.6),
                   impl=keywords.pop("impl", "auto"), mode=keywords.pop("mode", None), loss=LossOptions(**keywords))
        if spec.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {spec.impl!r}")
        paper_options(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), lam=spec.lam,
                      margin=spec.margin)  # lam and margin checked now
        if spec.mode is not None:
            LossOptions(mode=spec.mode)
        return spec


def _content_estimate(targets: Tensor, concepts: Tensor, ignore_index: int, num_items_in_batch):
    """|T| over the whole accumulated batch when only its valid-row count is known: this batch's content
    rows scaled by num_items_in_batch / this batch's valid rows (exact when every micro-batch has the same
    share of content rows; pass num_content for the exact count)."""
    valid = targets != ignore_index
    content = content_rows(targets, concepts, ignore_index).sum()
    return content * torch.as_tensor(num_items_in_batch, device=targets.device) / valid.sum().clamp(min=1)


def training_loss(hidden: Tensor, head: Head, targets: Tensor, concepts: Optional[Tensor] = None,
                  concept_probs: Optional[Tensor] = None, *, num_items_in_batch=None, num_content=None,
                  spec: TrainingLoss = TrainingLoss(), shift: Optional[bool] = None) -> Tensor:
    """The training loss of rows ``hidden`` [..., D] against ``head`` (module docstring). ``num_items_in_batch``
    (valid rows of the whole accumulated / data-parallel batch) replaces the local count N_v and
    ``num_content`` the local |T| (estimated from num_items_in_batch when not given); ``shift`` overrides the
    spec's."""
    hidden, bias = head.fold(hidden)
    base = spec.loss.replace(softcap=head.softcap, **({} if shift is None else {"shift": shift}))
    run = dict(bias=bias, impl=spec.impl, return_stats=False, kernel_options=None)
    if concepts is None:
        if concept_probs is not None:
            raise ValueError("concept_probs were given without concepts")
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = loss_with_options(hidden, head.weight, targets, None, concept_probs=None,
                                 options=base.replace(reduction=reduction), **run)
        if num_items_in_batch is None:
            return loss
        items = num_items_in_batch
        return loss / (items.to(loss.device) if torch.is_tensor(items) else items)
    mode = spec.mode or ("soft" if concept_probs is not None else "marginal")
    if concept_probs is not None and mode != "soft":
        raise ValueError(f'concept_probs need mode="soft", but the model was patched with mode={mode!r}')
    if num_content is None and num_items_in_batch is not None:
        rows = (targets[..., 1:], concepts[..., 1:, :]) if base.shift else (targets, concepts)
        num_content = _content_estimate(*rows, base.ignore_index, num_items_in_batch)
    keywords = {name: getattr(base, name) for name in LOSS_FIELDS
                if name not in ("ntp_weight", "concept_weight", "reduction", "margin", "ignore_index")}
    options = paper_options(targets, concepts, lam=spec.lam, margin=spec.margin, ignore_index=base.ignore_index,
                            num_valid=num_items_in_batch, num_content=num_content, **dict(keywords, mode=mode))
    return loss_with_options(hidden, head.weight, targets, concepts, concept_probs=concept_probs, options=options,
                             **run)


def is_fused(module) -> bool:
    return _FLAG in vars(module)


def fuse_head(module, *, scale: float = 1.0, softcap: Optional[float] = None, rows: Optional[int] = None,
              **loss_options):
    """Give the head ``module`` (any module with ``weight`` [V, D] and optional ``bias`` [V], e.g. an
    ``nn.Linear``) a forward that computes the training loss from its own weight; returns ``module``.

    Afterwards ``module(hidden, targets, concepts=None, *, concept_probs=None, num_items_in_batch=None,
    num_content=None)`` returns the loss of :func:`training_loss` on the logits
    ``softcap * tanh(scale * (W h + b) / softcap)`` of the first ``rows`` rows of the head (all when None),
    while ``module(hidden)`` is the module's own forward. ``loss_options``: lam, margin, impl, mode and the
    loss keywords of ``concept_loss`` that the objective leaves free (ignore_index, include_target, z_loss,
    label_smoothing, shift). Works before or after FSDP2's ``fully_shard`` and under torch.compile;
    :func:`unfuse_head` undoes it."""
    spec = TrainingLoss.of("fuse_head", loss_options)
    Head.of_module(module)  # fail now, not at the first forward
    unfuse_head(module)
    vars(module)[_FLAG] = dict(forward=module.forward, had_instance_forward="forward" in vars(module),
                               head=dict(scale=float(scale), softcap=softcap, rows=rows), spec=spec)
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


def head_of(module) -> Head:
    """The :class:`Head` of fused head ``module`` as it is now (inside its forward under FSDP2: gathered)."""
    return Head.of_module(module, **vars(module)[_FLAG]["head"])


def fused_spec(module) -> TrainingLoss:
    return vars(module)[_FLAG]["spec"]


def set_intercept(module, fn) -> None:
    """While ``fn`` is set (None unsets it), a call ``module(hidden)`` of fused head ``module`` (no targets) returns
    ``fn(module, hidden, **kwargs)`` instead of the logits. Code that calls the head itself (a transformers forward,
    ``self.lm_head(hidden_states)``) then runs ``fn`` inside the head's own forward, where FSDP2 has gathered the
    weight; ``fn`` computes the loss of targets it was given beforehand (``hf.patch``'s forward)."""
    vars(module)[_FLAG]["intercept"] = fn


def model_logits(module, hidden: Tensor) -> Tensor:
    """The logits of fused head ``module`` (its first ``rows`` rows, scaled and capped) from its own forward,
    so that FSDP2 gathers the weight as for any call."""
    head = vars(module)[_FLAG]["head"]
    raw = module(hidden)
    if head["rows"] is not None:
        raw = raw[..., : head["rows"]]
    return Head.of_module(module, **head).capped(raw)


def _fused_forward(self, hidden, targets=None, concepts=None, *, concept_probs=None, num_items_in_batch=None,
                   num_content=None, shift=None, **kwargs):
    state = vars(self)[_FLAG]
    if targets is None:
        if concepts is not None:
            raise ValueError("concepts were given without targets; pass targets too")
        intercept = state.get("intercept")
        if intercept is not None:  # a caller that set the targets beforehand (hf.patch's forward): see set_intercept
            return intercept(self, hidden, **kwargs)
        return state["forward"](hidden, **kwargs)
    if kwargs:
        raise TypeError(f"the fused head got unexpected keyword arguments {sorted(kwargs)}")
    head = Head.of_module(self, **state["head"])
    return training_loss(hidden, head, targets, concepts, concept_probs, num_items_in_batch=num_items_in_batch,
                         num_content=num_content, spec=state["spec"], shift=shift)
