"""Tiny random models of every transformers causal-LM family, and the check that ``hf.patch`` serves one.

`tiny_model(model_type)` builds the class that ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` names for the family from
its DEFAULT config scaled down (sizes, layers, heads, experts, vocabulary; the same rule for its sub-configs),
with the head features made visible: a softcap of 1, a Granite logits scaling of 0.4 (Cohere's default logit
scale 0.0625 is kept), the MoE router's aux loss switched on with coefficient 0.5. Nothing is downloaded.

`check_family(model_type)` is the contract of ``hf.patch`` for one family, on a batch with right padding
(attention_mask 0 and labels -100 there) and one more ignored label:

* ``labels=``: the patched model's loss and every gradient equal the unpatched model's (float32, rel 1e-5 on
  the loss), every term the family adds to its loss included (a MoE's router_aux_loss_coef * aux_loss), and
  ``aux_loss`` equals the unpatched one;
* ``concepts=``: the loss is the documented objective (float64 oracle, tests/helpers/contract.py, on the logits
  of a float64 copy of the unpatched model) plus the same extra terms, and so are the gradients;
* ``lora=True``: the same ``labels=`` comparison under a PEFT LoRA adapter on every linear layer.

It returns a `Result` (status "served", "refused" with the patch's error, or "failed" when the unpatched
model itself cannot be built or run); a wrong number raises `WrongNumbers`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from helpers.contract import contract_loss, paper_objective_weights

V, D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, EXPERTS, TOP_K, POSITIONS = 128, 32, 2, 4, 2, 8, 64, 4, 2, 64
B, T, K = 2, 9, 3

# (config keys, tiny value): every int entry of a config (and of its sub-configs) named so is set to the value
_SIZES = [
    (("vocab_size", "decoder_vocab_size"), V),
    (("hidden_size", "d_model", "n_embd", "embedding_size", "word_embed_proj_dim", "hidden_dim", "dim",
      "attention_hidden_size", "lru_width", "emb_dim"), D),
    (("intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "n_inner", "ffn_hidden_size",
      "intermediate_size_mlp", "dense_intermediate_size", "feed_forward_size", "d_inner", "dim_ff", "dff"), FFN),
    (("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
      "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size"), D),
    (("num_hidden_layers", "n_layer", "num_layers", "decoder_layers", "encoder_layers", "n_layers",
      "num_decoder_layers", "num_encoder_layers"), LAYERS),
    (("num_attention_heads", "n_head", "decoder_attention_heads", "encoder_attention_heads", "num_heads", "n_heads",
      "num_decoder_attention_heads", "num_encoder_attention_heads", "attention_heads"), HEADS),
    (("num_key_value_heads", "num_kv_heads", "num_query_groups"), KV_HEADS),
    (("head_dim", "attention_head_dim", "kv_channels", "dim_head", "d_head", "attention_head_size"), HEAD_DIM),
    (("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions"), POSITIONS),
    (("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), EXPERTS),
    (("num_experts_per_tok", "moe_topk", "top_k", "moe_k"), TOP_K),
    (("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "index_head_dim"), HEAD_DIM),
    (("qk_head_dim",), 2 * HEAD_DIM),
    (("kv_lora_rank",), 16),
    (("q_lora_rank",), 32),
    (("rotary_dim",), HEAD_DIM // 2),
]
_SIZE = {key: value for keys, value in _SIZES for key in keys}

# head features made visible on the tiny models (only where the default config has the key)
_FEATURES = dict(final_logit_softcapping=1.0, logits_scaling=0.4, router_aux_loss_coef=0.5, output_router_logits=True,
                 aux_loss_coef=0.5)

# families whose scaled-down default config needs more than the rule above (keys at the config's top level)
_OVERRIDES: dict = {}


@dataclasses.dataclass
class Result:
    model_type: str
    status: str  # "served", "refused", "failed"
    reason: str = ""
    checks: str = ""  # what was compared, with the largest errors


class WrongNumbers(AssertionError):
    """hf.patch served a family and gave a loss or a gradient that differs from the unpatched model's."""


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


_LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "mlp_layer_types", "attention_layer_types")
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers", "n_layers")


def _shrink(config_cls, defaults: dict) -> dict:
    """Keyword arguments of a tiny config of ``config_cls`` (None: a plain dict) from its defaults (to_dict())."""
    out = {}
    subs = (getattr(config_cls, "sub_configs", None) or {}) if config_cls is not None else {}
    for key, value in defaults.items():
        if isinstance(value, dict) and (key in subs or key.endswith("config")):
            sub_cls = subs.get(key)
            sub_defaults = dict(value)
            try:
                sub_defaults = {**sub_cls().to_dict(), **value}
            except Exception:
                sub_cls = None
            out[key] = _shrink(sub_cls, sub_defaults)
        elif key in _SIZE and _is_int(value) and value > _SIZE[key]:
            out[key] = _SIZE[key]
        elif key in _FEATURES:  # the family has the feature: switch it on, visibly
            out[key] = _FEATURES[key]
    for key in _LAYER_LISTS:  # a hybrid keeps one layer of each kind
        value = defaults.get(key)
        if isinstance(value, list) and len(value) > LAYERS:
            kinds = list(dict.fromkeys(map(str, value)))
            keep = [next(v for v in value if str(v) == k) for k in kinds] if len(kinds) > 1 else value[:LAYERS]
            keep = (keep * LAYERS)[:max(LAYERS, len(keep))]
            out[key] = keep
            for count in _LAYER_COUNTS:
                if count in defaults:
                    out[count] = len(keep)
    vocab = out.get("vocab_size", defaults.get("vocab_size"))
    if _is_int(vocab):
        taken = set()
        for key, value in defaults.items():
            if (key.endswith("token_id") or key.endswith("token_index")) and _is_int(value) and value >= vocab:
                spare = next(i for i in range(vocab - 1, 0, -1) if i not in taken)
                out[key] = spare
                taken.add(spare)
            elif key.endswith("token_id") and isinstance(value, list):
                out[key] = [v for v in value if _is_int(v) and v < vocab] or None
    return out


def causal_lm_types() -> list:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, **overrides):
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    kwargs = _shrink(config_cls, config_cls().to_dict())
    kwargs.pop("model_type", None)
    kwargs.pop("transformers_version", None)
    kwargs.pop("architectures", None)
    kwargs.update(_OVERRIDES.get(model_type, {}))
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """The family's causal-LM class on its tiny config, float32, eval mode (no dropout), seeded."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = tiny_config(model_type, **overrides)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    wants = getattr(cls, "config_class", None)
    if isinstance(wants, type) and not isinstance(config, wants):  # a text-only class of a multimodal family
        for text in (config.get_text_config(decoder=True), *(getattr(config, k, None) for k in config.sub_configs)):
            if isinstance(text, wants):
                config = text
                break
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    try:  # the grouped-mm experts take no float64 (the oracle's copy): the plain loop over experts
        model.set_experts_implementation("eager")
    except (ValueError, AttributeError, TypeError):
        pass
    _spread_logits(model)
    return model


@torch.no_grad()
def _spread_logits(model):
    """Initialisations give logits of std ~0.02 (every softmax uniform, a softcap or a scale invisible): scale
    the output embedding so that the raw head products have std ~2."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.std() > 0:
        weight.mul_(2.0 / (weight.std() * math.sqrt(weight.shape[1])))


def special_ids(config) -> set:
    ids = set()
    for cfg in (config, *(getattr(config, k, None) for k in (getattr(config, "sub_configs", None) or {}))):
        if cfg is None or not hasattr(cfg, "to_dict"):
            continue
        for key, value in cfg.to_dict().items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                for v in value if isinstance(value, list) else [value]:
                    if _is_int(v):
                        ids.add(v)
    return ids


def batch(model, seed: int = 1):
    """(input_ids, attention_mask, labels, concepts) [B, T(, K)]: ids avoid the config's special tokens; the
    second sequence is right-padded by 2 (mask 0, labels -100) and one more label is ignored; concepts have rows
    without a set, pads inside rows, a duplicate and the gold id listed."""
    rows = model.get_output_embeddings().weight.shape[0]
    rows = min(rows, getattr(model.config.get_text_config(), "unpadded_vocab_size", None) or rows)
    allowed = torch.tensor([i for i in range(3, rows) if i not in special_ids(model.config)])
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(0, len(allowed), (B, T), generator=g)]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0
    labels = ids.clone()
    labels[1, -2:] = -100
    labels[0, 4] = -100
    concepts = allowed[torch.randint(0, len(allowed), (B, T, K), generator=g)]
    concepts[torch.rand(B, T, generator=g) < 0.3] = -1
    concepts[:, :, 2][torch.rand(B, T, generator=g) < 0.5] = -1
    concepts[0, 2, 1] = concepts[0, 2, 0]
    concepts[0, 3, 0] = labels[0, 3]
    return ids, mask, labels, concepts


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _compare_grads(got, want, what, tol, family):
    """Every parameter's gradient: |got - want| <= tol * (|want| + 1e-2 * the largest gradient norm); returns the
    largest |got - want| / (|want| + 1e-2 * the largest norm)."""
    if set(got) != set(want):
        raise WrongNumbers(f"{family} {what}: gradients of {sorted(set(got) ^ set(want))[:4]} only on one side")
    scale = max((float(g.double().norm()) for g in want.values()), default=0.0)
    worst = 0.0
    for name, g in want.items():
        diff = float((got[name].double() - g.double()).norm())
        bound = tol * float(g.double().norm()) + tol * 1e-2 * scale
        if not diff <= bound:
            raise WrongNumbers(f"{family} {what}: gradient of {name} differs (|diff| {diff:.3g}, |want| "
                               f"{float(g.double().norm()):.3g})")
        worst = max(worst, diff / (float(g.double().norm()) + 1e-2 * scale))
    return worst


def _forward_kwargs(model):
    return dict(use_cache=False)


def check_family(model_type: str, *, model=None, lora: bool = False, objective: bool = True, loss_tol=1e-5,
                 grad_tol=1e-4, patch_options=None) -> Result:
    """The contract of hf.patch for one family (module docstring); raises WrongNumbers on a wrong number."""
    from fused_concept.integrations import hf

    patch_options = dict(patch_options or {})
    try:
        model = tiny_model(model_type) if model is None else model
        ids, mask, labels, concepts = batch(model)
        extra = _forward_kwargs(model)
        unpatched = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        unpatched.loss.backward()
    except Exception as err:  # the family itself: not a number of the patch's
        return Result(model_type, "failed", f"unpatched model: {type(err).__name__}: {_short(err)}")
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    float64 = None
    if objective:
        try:
            float64 = _float64_reference(model, ids, mask, labels, concepts, extra, patch_options)
        except Exception as err:
            return Result(model_type, "failed", f"float64 copy of the unpatched model: {type(err).__name__}: "
                                                f"{_short(err)}")
    try:
        hf.patch(model, **patch_options)
    except hf.UnsupportedModel as err:
        return Result(model_type, "refused", str(err))
    name = hf.family(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    if out.logits is not None:
        raise WrongNumbers(f"{name}: the patched labels= forward returned logits")
    if type(out) is not type(unpatched):
        raise WrongNumbers(f"{name}: output type {type(out).__name__}, unpatched {type(unpatched).__name__}")
    loss_err = abs(out.loss.item() - unpatched.loss.item()) / abs(unpatched.loss.item())
    if not loss_err <= loss_tol:
        raise WrongNumbers(f"{name} labels=: loss {out.loss.item():.7g}, unpatched {unpatched.loss.item():.7g}")
    aux = getattr(unpatched, "aux_loss", None)
    if aux is not None:
        got_aux = getattr(out, "aux_loss", None)
        if got_aux is None or _rel(got_aux, aux) > loss_tol:
            raise WrongNumbers(f"{name}: aux_loss {got_aux}, unpatched {aux}")
    out.loss.backward()
    worst = _compare_grads(_grads(model), want, "labels=", grad_tol, name)
    checks = [f"labels= loss {loss_err:.1e} grads {worst:.1e}" + (" (+aux_loss)" if aux is not None else "")]
    model.zero_grad(set_to_none=True)
    if float64 is not None:
        ref_loss, ref_grads = float64
        got = model(input_ids=ids, attention_mask=mask, labels=labels, concepts=concepts, **extra).loss
        err = abs(got.item() - ref_loss) / abs(ref_loss)
        if not err <= loss_tol * 2:
            raise WrongNumbers(f"{name} concepts=: loss {got.item():.7g}, float64 objective {ref_loss:.7g}")
        got.backward()
        worst = _compare_grads(_grads(model), ref_grads, "concepts=", grad_tol, name)
        checks.append(f"concepts= loss {err:.1e} grads {worst:.1e}")
        model.zero_grad(set_to_none=True)
    hf.unpatch(model)
    if lora:
        checks.append(_check_lora(model, ids, mask, labels, extra, loss_tol, grad_tol, patch_options))
    return Result(model_type, "served", "", "; ".join(checks))


def _float64_reference(model, ids, mask, labels, concepts, extra, patch_options):
    """(loss, grads) of the documented objective on a float64 copy of the unpatched model: the paper's objective of
    its logits (contract_loss with the logits as hidden states and an identity head) plus every term the family adds
    to its own labels= loss (its loss minus the cross-entropy of its logits)."""
    lam = patch_options.get("lam", 0.5)
    margin = patch_options.get("margin", 0.6)
    ref = copy.deepcopy(model).double()
    out = ref(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    logits = out.logits
    if logits.dtype != torch.float64:  # the family casts its logits (Mamba's .float()): take the head's own output
        raw = []
        hook = ref.get_output_embeddings().register_forward_hook(lambda m, i, o: raw.append(o))
        ref.zero_grad(set_to_none=True)
        out = ref(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        hook.remove()
        logits = _head_of(ref).capped(raw[-1][..., : _head_of(ref).weight.shape[0]])
        assert logits.dtype == torch.float64
    z, y, c = logits[:, :-1], labels[:, 1:], concepts[:, 1:]
    extra_terms = out.loss - F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)
    eye = torch.eye(z.shape[-1], dtype=torch.float64)
    objective, _ = contract_loss(z, eye, y, c, margin=margin, **paper_objective_weights(y, c, lam))
    loss = objective + extra_terms
    loss.backward()
    return float(loss), {n: g.float() for n, g in _grads(ref).items()}


def _head_of(model):
    from fused_concept.integrations.hf import model_head

    return model_head(model)


def _check_lora(model, ids, mask, labels, extra, loss_tol, grad_tol, patch_options):
    import peft

    from fused_concept.integrations import hf

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    want_out = lora(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    want_out.loss.backward()
    want = _grads(lora)
    lora.zero_grad(set_to_none=True)
    hf.patch(lora, **patch_options)
    name = hf.family(lora)
    out = lora(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    err = abs(out.loss.item() - want_out.loss.item()) / abs(want_out.loss.item())
    if not err <= loss_tol:
        raise WrongNumbers(f"{name} LoRA labels=: loss {out.loss.item():.7g}, unpatched {want_out.loss.item():.7g}")
    out.loss.backward()
    worst = _compare_grads(_grads(lora), want, "LoRA labels=", grad_tol, name)
    hf.unpatch(lora)
    return f"LoRA loss {err:.1e} grads {worst:.1e} ({len(want)} adapter tensors)"


def _short(err, n=300):
    text = " ".join(str(err).split())
    return text if len(text) <= n else text[: n - 3] + "..."
