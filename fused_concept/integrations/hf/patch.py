"""`patch(model)`: a transformers causal LM whose ``labels=`` forward computes the fused loss in its LM head
module (`fused_concept.fuse_head`), never the [tokens x vocab] logits; `unpatch` undoes it; `check_head` says
whether a model's logits are what the fused loss assumes (a base model, a head, a logit scale, a softcap)."""

from __future__ import annotations

import dataclasses
import inspect
import types

import torch

from fused_concept.fused_head import TrainingLoss, fuse_head, model_logits, unfuse_head
from fused_concept.integrations.hf.model_head import base_model, head_options, model_head, run_base, unwrap_peft

_PATCH_FLAG = "_fused_concept_patch"


def is_patched(model) -> bool:
    return _PATCH_FLAG in vars(unwrap_peft(model))


def original_forward(model):
    state = vars(model).get(_PATCH_FLAG)
    if state is None:
        return model.forward
    return state["forward"]


def _output_class(model):
    """The output dataclass the model's forward normally returns (CausalLMOutputWithPast when unknown)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    annotation = inspect.signature(type(model).forward).return_annotation
    if isinstance(annotation, str):
        import transformers.modeling_outputs as outputs_module

        annotation = getattr(outputs_module, annotation.split("|")[0].strip(), None)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        names = {f.name for f in dataclasses.fields(annotation)}
        if {"loss", "logits"} <= names:
            return annotation
    return CausalLMOutputWithPast


def patch(model, **loss_options):
    """Make ``model``'s forward compute the fused loss; returns ``model`` (patched in place).

    After ``patch``, ``model(input_ids, attention_mask=..., labels=..., concepts=..., concept_probs=...,
    return_logits=False)``:

    * shifts like transformers' causal-LM loss: position ``t`` predicts ``labels[:, t+1]``; ``concepts``
      ([B, T, K], ``-1`` pads) is aligned with ``labels`` (``concepts[b, t]`` is the concept set of the
      token ``labels[b, t]``) and shifted the same way; labels equal to ``ignore_index`` (-100) are dropped.
      A ``shift_labels`` keyword (already shifted labels, as transformers accepts) skips the shift.
    * with ``concepts``: ``loss = fused_concept.concept_objective(...)`` (the paper's objective, with
      ``lam`` and ``margin`` from ``loss_options``, defaults 0.5 and 0.6); with ``mode="soft"`` (or
      ``concept_probs``) or ``include_target=False``, the same per-row weights
      (``fused_concept._objective.paper_weights``) around ``concept_loss`` with those options;
      without: plain fused cross-entropy, ``fused_concept.concept_loss(..., reduction="mean")``.
      ``num_items_in_batch`` (the Trainer's global count of label tokens) turns the mean into
      sum / num_items_in_batch, like transformers, and is the objective's ``num_valid``; ``num_content``
      is its |T| (``ConceptTrainer`` passes the global count; when only ``num_items_in_batch`` is given,
      this batch's content rows scaled by num_items_in_batch / this batch's label tokens).
    * the loss is computed in the LM head module's own forward (:func:`fused_concept.fuse_head`), so a head
      sharded by FSDP2's ``fully_shard`` is gathered, and its gradient reduce-scattered, as for any layer.
    * returns the model's usual output type with ``.loss``; ``logits`` is None unless ``return_logits``.
    * without ``labels`` it is the original forward (logits included), so ``generate`` keeps working.
    * ``concept_probs`` (same shape as ``concepts``) selects the soft mode unless ``mode`` says otherwise.

    ``loss_options``: ``lam``, ``margin``, ``impl``, ``z_loss``, ``ignore_index``, ``include_target``,
    ``mode``. Works on PEFT-wrapped models too (the inner model is patched).
    """
    TrainingLoss.of("patch", loss_options)
    inner = unwrap_peft(model)
    base_model(inner)  # fail now, not at the first forward
    model_head(inner)
    if is_patched(inner):
        unpatch(inner)
    head = inner.get_output_embeddings()
    state = {
        "forward": inner.forward,
        "had_instance_forward": "forward" in vars(inner),
        "head": head,
        "output_class": _output_class(inner),
    }
    # read once here: torch.compile cannot trace dataclasses.fields of a class
    state["output_fields"] = frozenset(f.name for f in dataclasses.fields(state["output_class"]))
    fuse_head(head, **head_options(inner), **loss_options)
    vars(inner)[_PATCH_FLAG] = state
    inner.forward = types.MethodType(_patched_forward, inner)
    return model


def unpatch(model):
    """Undo :func:`patch`; returns ``model``. A model that is not patched is returned unchanged."""
    inner = unwrap_peft(model)
    state = vars(inner).pop(_PATCH_FLAG, None)
    if state is not None:
        unfuse_head(state["head"])
        if state["had_instance_forward"]:
            inner.forward = state["forward"]
        else:
            del inner.forward
    return model


def _patched_forward(
    self,
    input_ids=None,
    attention_mask=None,
    labels=None,
    concepts=None,
    concept_probs=None,
    return_logits=False,
    num_items_in_batch=None,
    num_content=None,
    shift_labels=None,
    return_dict=None,
    logits_to_keep=0,
    **kwargs,
):
    state = vars(self)[_PATCH_FLAG]
    if labels is None and shift_labels is None:
        if concepts is not None:
            raise ValueError("concepts were given without labels; pass labels (or shift_labels) too")
        return state["forward"](
            input_ids=input_ids, attention_mask=attention_mask, return_dict=return_dict,
            logits_to_keep=logits_to_keep, **kwargs,
        )

    outputs, hidden = run_base(self, input_ids, attention_mask, kwargs)
    targets, shift = _aligned_targets(hidden, labels, shift_labels, concepts, concept_probs)
    head = state["head"]
    if self.get_output_embeddings() is not head:
        raise RuntimeError("the model's LM head was replaced after fused_concept.hf.patch; patch the model again")
    # the loss runs in the head module's own forward, so FSDP2 gathers its weight as for any call; the shift is
    # the loss's own (shift=True moves the ids, never a copy of the hidden states)
    move = lambda x: None if x is None else x.to(hidden.device)  # noqa: E731
    loss = head(hidden, targets, move(concepts), concept_probs=move(concept_probs),
                num_items_in_batch=num_items_in_batch, num_content=num_content, shift=shift)
    logits = model_logits(head, hidden) if return_logits else None
    output_class, names = state["output_class"], state["output_fields"]
    items = outputs.items() if hasattr(outputs, "items") else ()
    fields = {k: v for k, v in items if k in names and k not in ("loss", "logits")}
    result = output_class(loss=loss, logits=logits, **fields)
    if return_dict is False:
        return result.to_tuple()
    return result


def _aligned_targets(hidden, labels, shift_labels, concepts, concept_probs):
    """(targets on hidden's device, whether the loss shifts them): `labels` are aligned with input_ids
    (position t predicts labels[:, t + 1], as transformers' causal-LM loss shifts), `shift_labels` are
    already shifted. `concepts` / `concept_probs` must be aligned the same way as whichever was given."""
    given, name = (shift_labels, "shift_labels") if shift_labels is not None else (labels, "labels")
    if given.shape != hidden.shape[:2]:
        raise ValueError(f"{name} has shape {tuple(given.shape)}, expected {tuple(hidden.shape[:2])} (batch, sequence "
                         "of input_ids)")
    for what, t in (("concepts", concepts), ("concept_probs", concept_probs)):
        if t is not None and (t.dim() != 3 or t.shape[:2] != given.shape):
            raise ValueError(f"{what} has shape {tuple(t.shape)}, but hf.patch expects it aligned with {name}: "
                             f"{tuple(given.shape)} + (K,), {what}[b, t] being the concept set of the token "
                             f"{name}[b, t]; the model shifts it together with {name}, so pass it unshifted")
    return given.to(hidden.device), shift_labels is None


@torch.no_grad()
def check_head(model, input_ids=None, *, atol=1e-4, rtol=1e-4) -> float:
    """Check that :func:`hidden_and_head` reproduces the model's own logits; returns the max abs difference.

    Runs the unpatched forward and the head recomputation on ``input_ids`` (a short default when None)
    and raises ``ValueError`` naming the architecture when they differ beyond the tolerances.
    """
    inner = unwrap_peft(model)
    head = model_head(inner)
    if input_ids is None:
        input_ids = torch.arange(1, 9, device=head.weight.device).remainder(head.weight.shape[0])[None]
    was_training = inner.training
    inner.eval()  # dropout would make the two passes differ
    try:
        expected = original_forward(inner)(input_ids=input_ids, return_dict=True).logits.float()
        _, hidden = run_base(inner, input_ids, None, {})
    finally:
        inner.train(was_training)
    got = head.logits(hidden).float()
    name = type(inner).__name__
    if got.shape != expected.shape:
        raise ValueError(f"fused_concept.hf cannot reproduce the logits of {name}: they have shape "
                         f"{tuple(expected.shape)}, the head gives {tuple(got.shape)}")
    diff = (got - expected).abs().max().item()
    if not torch.allclose(got, expected, atol=atol, rtol=rtol):
        raise ValueError(f"fused_concept.hf cannot reproduce the logits of {name} (max abs difference {diff:.3g}); "
                         "its forward does more than a base model, a head, a logit scale and a softcap")
    return diff
