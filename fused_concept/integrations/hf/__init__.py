"""Hugging Face transformers integration: causal LMs that never materialise [tokens x vocab] logits.

A causal LM's usual forward computes ``logits = head(h)`` for every position and then a cross-entropy.
After :func:`patch`, its forward stops at the final hidden states ``h`` and calls the LM head module with
``h`` and the targets; the head's own forward (:func:`fused_concept.fuse_head`) hands its weight, bias,
logit scale and softcap (:class:`fused_concept.head.Head`) to :func:`fused_concept.concept_loss` /
:func:`fused_concept.concept_objective`, which compute the same loss (and gradients) without ever holding
the logits. Computing it inside the head's forward lets FSDP2 gather a sharded head as for any layer.
:func:`unpatch` undoes it. For ``transformers.Trainer``: :class:`ConceptCollator` and :class:`ConceptTrainer`
(``trainer.py``).

Also here, for convenience: :func:`hidden_and_head` and :func:`check_head` (``model_head.py``) and the model
loaders (``models.py``). The patched forward is the family's own (``patch.py`` says how), so what a family does
before its head and to its loss afterwards stays; a family whose forward does more between its head and its loss
than a logit scale, a softcap and padding rows, or computes its loss without ``self.loss_function``, is refused
by :func:`patch` (:class:`UnsupportedModel`). :func:`check_head` checks :func:`hidden_and_head` (base model + head)
against the model's own logits.
"""
from __future__ import annotations

from fused_concept.integrations.hf.model_head import base_model, hidden_and_head, model_head, unwrap_peft
from fused_concept.integrations.hf.models import (DEFAULT_GGUF_FILE, DEFAULT_GGUF_PACKAGE, default_gguf_path,
                                                  load_default_model, load_default_tokenizer, load_model)
from fused_concept.integrations.hf.patch import (REFUSED_FAMILIES, UnsupportedModel, check_head, family, is_patched,
                                                 patch, unpatch)

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "family",
    "UnsupportedModel",
    "REFUSED_FAMILIES",
    "ConceptCollator",
    "ConceptTrainer",
    "model_head",
    "base_model",
    "hidden_and_head",
    "check_head",
    "unwrap_peft",
    "load_default_model",
    "load_default_tokenizer",
    "load_model",
    "default_gguf_path",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_GGUF_PACKAGE",
]


def __getattr__(name):
    # the Trainer pieces import transformers.Trainer (slow): loaded on first use
    if name in ("ConceptCollator", "ConceptTrainer"):
        from fused_concept.integrations.hf import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
