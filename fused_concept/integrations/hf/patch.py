"""`patch(model)`: a transformers causal LM whose ``labels=`` forward computes the fused loss in its LM head
module (`fused_concept.fuse_head`), never the [tokens x vocab] logits; `unpatch` undoes it; `check_head` says
whether a model's logits are what the fused loss assumes (a base model, a head, a logit scale, a softcap).

How, for every family at once: the patched forward runs the family's OWN forward, with two substitutions that
last one call. The LM head module, when the forward calls it (``self.lm_head(hidden_states)``), computes the
fused loss of the labels from the hidden states it receives and returns a zero-width placeholder instead of the
logits; the model's ``loss_function`` (the causal-LM cross-entropy every family calls on its logits) returns
that loss. Whatever the family does before its head (a final norm, a scaling of the hidden states, BERT's
prediction transform) and to its loss afterwards (``loss += router_aux_loss_coef * aux_loss`` of a mixture of
experts) is the family's own code, so it stays; ``aux_loss`` and the other outputs are the family's own too.
What the fused loss must know instead is what the family does to its logits between the head and the loss (a
logit scale, a softcap, padding rows): `model_head.head_options` reads it off the config, and `patch` checks it
on a probe forward against the unpatched model (loss and logits), refusing the model when they differ.
"""

from __future__ import annotations

import inspect
import types

import torch

from fused_concept.fused_head import TrainingLoss, fuse_head, fused_spec, head_of, set_intercept, training_loss, unfuse_head
from fused_concept.integrations.hf.model_head import head_options, model_head, run_base, unwrap_peft

_PATCH_FLAG = "_fused_concept_patch"

# Family facts: model types the patch refuses whatever a probe says, and why (found by `make hf-families`,
# tests/integrations/hf_families_sweep.py). Every other family is checked on a probe forward when patched.
REFUSED_FAMILIES: dict = {}


class UnsupportedModel(TypeError):
    """``hf.patch`` cannot give this model's ``labels=`` loss (the message names the family and why)."""


def family(model) -> str:
    """``"model_type (ClassName)"`` of a (PEFT-wrapped) transformers model, as error messages name it."""
    inner = unwrap_peft(model)
    kind = getattr(getattr(inner, "config", None), "model_type", None) or "?"
    return f"{kind} ({type(inner).__name__})"


def is_patched(model) -> bool:
    return _PATCH_FLAG in vars(unwrap_peft(model))


def original_forward(model):
    state = vars(model).get(_PATCH_FLAG)
    if state is None:
        return model.forward
    return state["forward"]


def _refusal(inner):
    """Why ``inner`` cannot be patched, read off its class and config without running it (None: no reason)."""
    kind = getattr(inner.config, "model_type", None)
    if kind in REFUSED_FAMILIES:
        return REFUSED_FAMILIES[kind]
    try:
        model_head(inner)
    except (TypeError, AttributeError) as err:
        return str(err)
    if "_loss_function" in vars(inner):
        return ("it was given its own loss_function, which the fused loss would replace by the causal-LM "
                "cross-entropy")
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss

        loss_function = inner.loss_function
    except (ImportError, AttributeError):
        return "it has no transformers loss_function (not a transformers PreTrainedModel?)"
    if loss_function is not ForCausalLMLoss:
        name = getattr(loss_function, "__name__", repr(loss_function))
        return f"its labels= loss is {name}, not the causal-LM cross-entropy (ForCausalLMLoss) that the fused loss computes"
    try:
        source = inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        return None  # no source to read: the probe decides
    if "loss_function(" not in source and "super().forward(" not in source:
        return ("its forward computes the labels= loss itself (not with self.loss_function), so the fused loss "
                "cannot take its place")
    return None


def patch(model, *, check: bool = True, **loss_options):
    """Make ``model``'s forward compute the fused loss; returns ``model`` (patched in place).

    After ``patch``, ``model(input_ids, attention_mask=..., labels=..., concepts=..., concept_probs=...,
    return_logits=False, **the model's own keywords)``:

    * shifts like transformers' causal-LM loss: position ``t`` predicts ``labels[:, t+1]``; ``concepts``
      ([B, T, K], ``-1`` pads) is aligned with ``labels`` (``concepts[b, t]`` is the concept set of the
      token ``labels[b, t]``) and shifted the same way; labels equal to ``ignore_index`` (-100) are dropped.
      A ``shift_labels`` keyword (already shifted labels, as transformers accepts) skips the shift.
    * with ``concepts``: ``loss = fused_concept.concept_objective(...)`` (the paper's objective, with
      ``lam`` and ``margin`` from ``loss_options``, defaults 0.5 and 0.6); with ``mode="soft"`` (or
      ``concept_probs``) or ``include_target=False``, the same per-row weights
      (``fused_concept.core.objective.paper_weights``) around ``concept_loss`` with those options;
      without: plain fused cross-entropy, ``fused_concept.concept_loss(..., reduction="mean")``.
      ``num_items_in_batch`` (the Trainer's global count of label tokens) turns the mean into
      sum / num_items_in_batch, like transformers, and is the objective's ``num_valid``; ``num_content``
      is its |T| (``ConceptTrainer`` passes the global count; when only ``num_items_in_batch`` is given,
      this batch's content rows scaled by num_items_in_batch / this batch's label tokens).
    * every term the family adds to that loss stays (a mixture of experts' ``router_aux_loss_coef * aux_loss``
      with ``output_router_logits=True``), and ``aux_loss`` and the other outputs are the model's own: the
      model's own forward runs, its head computing the fused loss (module docstring).
    * the loss is computed in the LM head module's own forward (:func:`fused_concept.fuse_head`), so a head
      sharded by FSDP2's ``fully_shard`` is gathered, and its gradient reduce-scattered, as for any layer.
    * returns the model's usual output type with ``.loss``; ``logits`` is None unless ``return_logits``.
    * without ``labels`` it is the original forward (logits included), so ``generate`` keeps working.
    * ``concept_probs`` (same shape as ``concepts``) selects the soft mode unless ``mode`` says otherwise.

    A model the patch cannot serve raises :class:`UnsupportedModel` (a ``TypeError``) naming its family and why:
    one whose forward computes its loss without ``self.loss_function``, whose loss is not the causal-LM
    cross-entropy, that has no LM head module, or (``check=True``, the default) whose ``labels=`` loss or logits
    on a probe forward (one sequence of 8 tokens, in eval mode, without gradients or cache, the random state
    restored)
    differ between the unpatched and the patched model. ``check=False`` skips the probe (a model on the meta
    device is never probed).

    ``loss_options``: ``lam``, ``margin``, ``impl``, ``z_loss``, ``ignore_index``, ``include_target``,
    ``mode``. Works on PEFT-wrapped models too (the inner model is patched).
    """
    TrainingLoss.of("patch", loss_options)
    inner = unwrap_peft(model)
    if is_patched(inner):
        unpatch(inner)
    why = _refusal(inner)
    if why is not None:
        raise UnsupportedModel(f"fused_concept.hf.patch cannot serve {family(inner)}: {why}")
    probe = _probe_inputs(inner) if check else None
    expected = _run_probe(inner, probe, patched=False) if probe is not None else None
    _install(inner, loss_options)
    if probe is not None:
        try:
            _compare_probe(inner, expected, _run_probe(inner, probe, patched=True))
        except BaseException:
            unpatch(inner)
            raise
    return model


def _install(inner, loss_options):
    head = inner.get_output_embeddings()
    forward = inner.forward
    params = inspect.signature(forward).parameters.values()
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    state = {
        "forward": forward,
        "had_instance_forward": "forward" in vars(inner),
        "head": head,
        "family": family(inner),
        "var_keyword": var_keyword,
        "return_dict": var_keyword or "return_dict" in inspect.signature(forward).parameters,
        "call": None,
    }
    fuse_head(head, **head_options(inner), **loss_options)
    vars(inner)[_PATCH_FLAG] = state
    inner.loss_function = types.MethodType(_call_loss, inner)  # transformers' own setter (an instance attribute)
    inner.forward = types.MethodType(_patched_forward, inner)


def unpatch(model):
    """Undo :func:`patch`; returns ``model``. A model that is not patched is returned unchanged."""
    inner = unwrap_peft(model)
    state = vars(inner).pop(_PATCH_FLAG, None)
    if state is not None:
        unfuse_head(state["head"])
        vars(inner).pop("_loss_function", None)
        if state["had_instance_forward"]:
            inner.forward = state["forward"]
        else:
            del inner.forward
    return model


class _Call:
    """One labelled forward of a patched model: the targets, handed to the head when the family's forward calls
    it, and the loss the head computed, handed to the family's forward by its loss_function."""

    def __init__(self, labels, shift_labels, concepts, concept_probs, num_items_in_batch, num_content,
                 return_logits):
        self.labels, self.shift_labels = labels, shift_labels
        self.concepts, self.concept_probs = concepts, concept_probs
        self.num_items_in_batch, self.num_content = num_items_in_batch, num_content
        self.return_logits = return_logits
        self.loss = self.logits = None
        self.head_calls = self.loss_calls = 0

    def head_forward(self, module, hidden, **kwargs):
        """The head's forward during the call: the fused loss of the targets, and a zero-width placeholder
        for the logits (what the family then does to them costs nothing)."""
        if kwargs:
            raise TypeError(f"the fused head got unexpected keyword arguments {sorted(kwargs)}")
        self.head_calls += 1
        if self.head_calls > 1:
            raise RuntimeError("the model's forward called its LM head twice in one forward; fused_concept.hf.patch "
                               "computes the loss in the one call that gives the logits")
        targets, shift = _aligned_targets(hidden, self.labels, self.shift_labels, self.concepts, self.concept_probs)
        move = lambda x: None if x is None else x.to(hidden.device)  # noqa: E731
        head = head_of(module)
        self.loss = training_loss(hidden, head, targets, move(self.concepts), move(self.concept_probs),
                                  num_items_in_batch=self.num_items_in_batch, num_content=self.num_content,
                                  spec=fused_spec(module), shift=shift)
        if self.return_logits:
            self.logits = head.logits(hidden)
        return hidden.new_zeros((*hidden.shape[:-1], 0))


def _call_loss(self, *args, **kwargs):
    """The patched model's loss_function (what its forward calls on its logits): the loss its head computed."""
    state = vars(self)[_PATCH_FLAG]
    call = state["call"]
    if call is None:
        raise RuntimeError(f"{state['family']} is patched by fused_concept.hf: its labels= loss is computed by the "
                           "patched forward (model(...)), not by its loss_function alone")
    if call.loss is None:
        raise RuntimeError(f"fused_concept.hf.patch cannot serve {state['family']}: its forward computed its logits "
                           "without calling its LM head module (get_output_embeddings())")
    call.loss_calls += 1
    if call.loss_calls > 1:
        raise RuntimeError(f"fused_concept.hf.patch cannot serve {state['family']}: its forward calls its "
                           "loss_function more than once")
    return call.loss


def _patched_forward(self, input_ids=None, attention_mask=None, labels=None, concepts=None, concept_probs=None,
                     return_logits=False, num_items_in_batch=None, num_content=None, shift_labels=None,
                     return_dict=None, **kwargs):
    state = vars(self)[_PATCH_FLAG]
    given = {k: v for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask)) if v is not None}
    if labels is None and shift_labels is None:
        if concepts is not None:
            raise ValueError("concepts were given without labels; pass labels (or shift_labels) too")
        if return_dict is not None:
            kwargs["return_dict"] = return_dict
        return state["forward"](**given, **kwargs)

    head = state["head"]
    if self.get_output_embeddings() is not head:
        raise RuntimeError("the model's LM head was replaced after fused_concept.hf.patch; patch the model again")
    call = _Call(labels, shift_labels, concepts, concept_probs, num_items_in_batch, num_content, return_logits)
    if num_items_in_batch is not None and state["var_keyword"]:
        kwargs["num_items_in_batch"] = num_items_in_batch  # the model sees what the Trainer gives it
    if state["return_dict"]:
        kwargs["return_dict"] = True
    state["call"] = call
    set_intercept(head, call.head_forward)
    try:
        # the family's own forward: its loss_function gets the loss of the targets (labels is only a switch there)
        outputs = state["forward"](**given, labels=labels if labels is not None else shift_labels, **kwargs)
    finally:
        set_intercept(head, None)
        state["call"] = None
    if call.loss_calls != 1:
        raise RuntimeError(f"fused_concept.hf.patch cannot serve {state['family']}: its forward did not call its "
                           "loss_function on the labels")
    if not hasattr(outputs, "items"):
        raise RuntimeError(f"fused_concept.hf.patch cannot serve {state['family']}: its forward returned a "
                           f"{type(outputs).__name__}, not a ModelOutput")
    fields = {k: v for k, v in outputs.items() if k != "logits"}
    if call.logits is not None:
        fields["logits"] = call.logits
    result = type(outputs)(**fields)
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


# ----------------------------------------------------------------------------------------------- the probe


def _probe_inputs(inner):
    """(input_ids, labels) [1, 8] on the input embedding's device, or None when there is nothing to run on."""
    embedding = inner.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if weight is None:
        weight = model_head(inner).weight
    if weight.device.type == "meta":
        return None
    vocab = model_head(inner).weight.shape[0]
    if isinstance(getattr(weight, "shape", None), torch.Size) and weight.dim() == 2:
        vocab = min(vocab, weight.shape[0])
    low = 3 if vocab > 8 else 0  # away from the usual pad / bos / eos ids
    ids = (torch.arange(8, device=weight.device) * 7).remainder(vocab - low)[None] + low
    labels = ids.clone()
    labels[0, 2] = -100
    return ids, labels


def _run_probe(inner, probe, patched):
    ids, labels = probe
    forward = original_forward(inner)
    params = inspect.signature(forward).parameters
    # training does without a cache (and hybrid families' caches reject a first layer that is not attention)
    keywords = {"use_cache": False} if "use_cache" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else {}
    was_training = inner.training
    devices = [ids.device] if ids.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            inner.eval()
            if patched:
                return inner(input_ids=ids, labels=labels, return_logits=True, **keywords)
            return inner(input_ids=ids, labels=labels, return_dict=True, **keywords)
    except Exception as err:
        side = "patched" if patched else "unpatched"
        raise UnsupportedModel(f"fused_concept.hf.patch cannot serve {family(inner)}: its {side} forward failed on a "
                               f"probe input_ids [1, 8] with labels ({type(err).__name__}: {err}); "
                               "patch(..., check=False) skips the probe") from err
    finally:
        inner.train(was_training)


def _compare_probe(inner, expected, got):
    """Raise UnsupportedModel unless the patched probe forward gave the unpatched one's loss and logits."""
    name = family(inner)
    dtype = model_head(inner).weight.dtype
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2

    def rel(a, b):
        a, b = a.detach().double(), b.detach().to(a.device).double()
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    want_logits, got_logits = getattr(expected, "logits", None), getattr(got, "logits", None)
    if want_logits is None or got_logits is None or want_logits.shape != got_logits.shape:
        shapes = [None if t is None else tuple(t.shape) for t in (want_logits, got_logits)]
        raise UnsupportedModel(f"fused_concept.hf.patch cannot serve {name}: its logits have shape {shapes[0]}, the "
                               f"fused head's {shapes[1]}")
    diff = rel(got_logits, want_logits)
    if not diff <= tol:
        raise UnsupportedModel(f"fused_concept.hf.patch cannot serve {name}: its logits differ from the fused head's "
                               f"(relative difference {diff:.3g} on a probe): its forward does more between the LM "
                               "head and the loss than a logit scale, a softcap and padding rows")
    want_loss, got_loss = expected.loss, got.loss
    if want_loss is None or got_loss is None:
        raise UnsupportedModel(f"fused_concept.hf.patch cannot serve {name}: its forward returned no labels= loss")
    want_loss, got_loss = want_loss.detach().double().cpu(), got_loss.detach().double().cpu()
    if not abs(float(got_loss) - float(want_loss)) <= tol * max(1.0, abs(float(want_loss))):
        raise UnsupportedModel(f"fused_concept.hf.patch cannot serve {name}: its labels= loss is {float(want_loss):.6g}, "
                               f"the patched model's {float(got_loss):.6g} on a probe: the family adds a term to its "
                               "loss that the fused loss does not reproduce")
    for field in ("aux_loss",):
        a, b = getattr(expected, field, None), getattr(got, field, None)
        if (a is None) != (b is None) or (a is not None and rel(b, a) > tol):
            raise UnsupportedModel(f"fused_concept.hf.patch cannot serve {name}: its {field} differs when patched")


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
