"""The LM head of a transformers causal LM as a :class:`fused_concept.head.Head`, and its trunk.

A causal LM computes ``logits = softcap * tanh(scale * (W h + b) / softcap)`` (no tanh without a softcap)
from its base model's final hidden states ``h``; :func:`model_head` reads ``W``, ``b``, the architecture's
logit ``scale`` and ``softcap`` off the model and its config. Scales read from the config: Cohere's ``logit_scale`` (multiply), Granite's ``logits_scaling``
(divide), Falcon-H1's ``lm_head_multiplier`` and MuseSpark's ``output_multiplier`` (multiply); Gemma 2/3's
``final_logit_softcapping`` is the softcap; a config's ``unpadded_vocab_size`` trims the head's padding
rows. Tied embeddings need nothing special: ``W`` is the very Parameter the input embedding uses.
"""
from __future__ import annotations


from torch import Tensor

from fused_concept.head import Head

# (config attribute, how it acts on the logits). Read from the text config of the model.
_LOGIT_MULTIPLIERS = ("logit_scale", "lm_head_multiplier", "output_multiplier")  # logits = logits * value
_LOGIT_DIVISORS = ("logits_scaling",)  # logits = logits / value

# Family facts: causal-LM classes whose forward departs from the rule above (found by `make hf-families`, which
# compares every family's patched loss with its own). Keys: "multiply" (config attributes it multiplies by,
# instead of dividing), "softcap" False (it applies no final_logit_softcapping, although its config has one).
_HEAD_FACTS = {
    "HyperCLOVAXForCausalLM": dict(multiply=("logits_scaling",)),  # MuP: logits * logits_scaling
    "Gemma3ForConditionalGeneration": dict(softcap=False),  # only Gemma3ForCausalLM caps its logits
}


def unwrap_peft(model):
    """PEFT wraps the transformers model; the head and the patch live on the inner one."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _text_config(model):
    config = model.config
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:  # older signature
            return config.get_text_config()
    return config


def base_model(model):
    """The decoder stack without the LM head (``model.model`` for Llama, ``model.transformer`` for GPT-2)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if base is None and hasattr(model, "get_decoder"):
        base = model.get_decoder()
    if base is None or base is model:
        raise TypeError(
            f"{type(model).__name__} has no separate base model (base_model_prefix={prefix!r}); "
            "fused_concept.hf needs a causal LM made of a base model plus an LM head"
        )
    return base


def _config_scale(config, facts=None) -> float:
    """The product of every scalar the architecture multiplies its logits by (1.0 when none)."""
    multiply = _LOGIT_MULTIPLIERS + tuple((facts or {}).get("multiply", ()))
    scale = 1.0
    for name in _LOGIT_MULTIPLIERS + _LOGIT_DIVISORS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale = scale * float(value) if name in multiply else scale / float(value)
    return scale


def head_options(model) -> dict:
    """What a causal LM's config says about its head: the logit ``scale``, the ``softcap`` and the ``rows``
    that are real vocabulary (None: all), as keywords of :meth:`Head.of_module` and ``fuse_head``."""
    config = _text_config(model)
    facts = _HEAD_FACTS.get(type(model).__name__, {})
    weight = getattr(model.get_output_embeddings(), "weight", None)
    unpadded = getattr(config, "unpadded_vocab_size", None)
    padded = isinstance(unpadded, int) and isinstance(weight, Tensor) and 0 < unpadded < weight.shape[0]
    cap = getattr(config, "final_logit_softcapping", None) if facts.get("softcap", True) else None
    return dict(scale=_config_scale(config, facts), softcap=float(cap) if cap else None,
                rows=unpadded if padded else None)


def model_head(model) -> Head:
    """The head of a transformers causal LM (PEFT-wrapped or not); rows past the config's
    ``unpadded_vocab_size`` (padding the model slices off its logits) are left out."""
    model = unwrap_peft(model)
    module = model.get_output_embeddings()
    if module is None:
        raise TypeError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
    return Head.of_module(module, **head_options(model))


def run_base(model, input_ids, attention_mask, kw):
    """(base model outputs, final hidden states) of one forward without the LM head."""
    model = unwrap_peft(model)
    outputs = base_model(model)(input_ids=input_ids, attention_mask=attention_mask, **kw)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return outputs, hidden


def hidden_and_head(model, input_ids=None, attention_mask=None, **kw):
    """Run ``model`` without its LM head: returns ``(hidden [B,T,D], weight [V,D], bias [V] or None, softcap or None)``.

    The model's logits equal ``softcap * tanh((hidden @ weight.T + bias) / softcap)`` (no tanh when
    ``softcap`` is None): the architecture's logit scale is already folded into ``hidden`` and ``bias``.
    ``weight`` is the head's own Parameter (the input embedding's when tied), so gradients flow to it.
    Extra keyword arguments (``position_ids``, ``inputs_embeds``, ``past_key_values``, ``use_cache``, ...)
    go to the base model unchanged.
    """
    _, hidden = run_base(model, input_ids, attention_mask, kw)
    head = model_head(model)
    hidden, bias = head.fold(hidden)
    return hidden, head.weight, bias, head.softcap
