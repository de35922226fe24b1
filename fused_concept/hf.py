"""Hugging Face transformers integration: causal LMs that never materialise [tokens x vocab] logits.

A causal LM's usual forward computes ``logits = head(h)`` for every position and then a cross-entropy.
After :func:`patch`, its forward stops at the final hidden states ``h`` and calls the LM head module with
``h`` and the targets; the head's own forward (:func:`fused_concept.fuse_head`) hands its weight, bias,
logit scale and softcap (:class:`fused_concept._head.Head`) to :func:`fused_concept.concept_loss` /
:func:`fused_concept.concept_objective`, which compute the same loss (and gradients) without ever holding
the logits. Computing it inside the head's forward lets FSDP2 gather a sharded head as for any layer.
:func:`unpatch` undoes it. For ``transformers.Trainer``: :class:`ConceptCollator` and :class:`ConceptTrainer`
(``fused_concept/_hf_trainer.py``).

Also here, for convenience: :func:`hidden_and_head` and :func:`check_head` (the head description,
``fused_concept/_head.py``) and the model loaders (``fused_concept/_models.py``). Architectures whose
causal-LM forward does more between the base model and the head than a logit scale and a softcap are
not supported; :func:`check_head` compares against the model's own logits and says so.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

from ._fused_head import check_loss_options, fuse_head, model_logits, unfuse_head
from ._head import Head, base_model, check_head, head_options, hidden_and_head, run_base, unwrap_peft
from ._models import (DEFAULT_GGUF_FILE, DEFAULT_GGUF_PACKAGE, default_gguf_path, load_default_model,
                      load_default_tokenizer, load_model)

__all__ = [
    "Head",
    "base_model",
    "hidden_and_head",
    "check_head",
    "patch",
    "unpatch",
    "ConceptCollator",
    "ConceptTrainer",
    "is_patched",
    "load_default_model",
    "load_default_tokenizer",
    "load_model",
    "default_gguf_path",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_GGUF_PACKAGE",
]

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
    check_loss_options("patch", loss_options)
    inner = unwrap_peft(model)
    base_model(inner)  # fail now, not at the first forward
    Head.of(inner)
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
    hidden_rows, targets, concepts, concept_probs = _aligned_rows(hidden, labels, shift_labels, concepts, concept_probs)
    head = state["head"]
    if self.get_output_embeddings() is not head:
        raise RuntimeError("the model's LM head was replaced after fused_concept.hf.patch; patch the model again")
    # the loss runs in the head module's own forward, so FSDP2 gathers its weight as for any call
    loss = head(hidden_rows, targets, concepts, concept_probs=concept_probs, num_items_in_batch=num_items_in_batch,
                num_content=num_content)
    logits = model_logits(head, hidden) if return_logits else None
    output_class, names = state["output_class"], state["output_fields"]
    items = outputs.items() if hasattr(outputs, "items") else ()
    fields = {k: v for k, v in items if k in names and k not in ("loss", "logits")}
    result = output_class(loss=loss, logits=logits, **fields)
    if return_dict is False:
        return result.to_tuple()
    return result


def _aligned_rows(hidden, labels, shift_labels, concepts, concept_probs):
    """(hidden rows, targets, concepts, concept_probs) with position t predicting token t+1, as
    transformers' causal-LM loss shifts; `shift_labels` are taken as already shifted."""
    if shift_labels is not None:
        return hidden, shift_labels.to(hidden.device), concepts, concept_probs
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:2])}")
    shift = lambda t: None if t is None else t[:, 1:].to(hidden.device)  # noqa: E731
    return hidden[:, :-1], shift(labels), shift(concepts), shift(concept_probs)


def __getattr__(name):
    # the Trainer pieces import transformers.Trainer (slow): loaded on first use
    if name in ("ConceptCollator", "ConceptTrainer"):
        from . import _hf_trainer

        return getattr(_hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
