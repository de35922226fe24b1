"""hf.patch over representative transformers causal-LM families (tiny random configs, tests/helpers/hf_families.py):
the unpatched labels= loss and gradients (router aux loss included), the float64 documented objective with
concepts, padding masks, LoRA on two families, and the refusal of a family it cannot serve. The full sweep of
every family is `make hf-families`."""
import pytest
import torch

from helpers import hf_families as H

transformers = pytest.importorskip("transformers")
from fused_concept.integrations import hf  # noqa: E402

# one family per head feature: plain and tied embeddings (llama, gpt2), a BERT-style prediction transform before
# the decoder and a head bias (bert), softcap (gemma2, gemma3_text with the
# cap on), logit scale (cohere multiplies, granite divides, hyperclovax multiplies its logits_scaling), MoE with
# the router aux loss (mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoe), state-space (mamba: float32 logits cast)
FAMILIES = ["llama", "gpt2", "bert", "gemma2", "gemma3_text", "cohere", "granite", "hyperclovax", "mixtral",
            "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "falcon_mamba"]
LORA = ["llama", "mixtral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_served_with_the_unpatched_numbers(family):
    result = H.check_family(family, lora=family in LORA)
    assert result.status == "served", result
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"):
        assert "+aux_loss" in result.checks  # the router aux loss was on, and compared


def test_the_features_are_visible_on_the_tiny_models():
    """Negative controls: the softcap, the scales and the aux loss change the numbers on these models."""
    gemma = H.tiny_model("gemma2")
    assert hf.model_head(gemma).softcap == 1.0
    ids, mask, labels, _ = H.batch(gemma)
    hidden, weight, _, cap = hf.hidden_and_head(gemma, ids)
    raw = hidden @ weight.t()
    assert (raw - torch.tanh(raw)).abs().max() > 0.5
    assert hf.model_head(H.tiny_model("cohere")).scale == pytest.approx(0.0625)
    assert hf.model_head(H.tiny_model("granite")).scale == pytest.approx(1 / 0.4)
    assert hf.model_head(H.tiny_model("hyperclovax")).scale == pytest.approx(0.4)
    mixtral = H.tiny_model("mixtral")
    ids, mask, labels, _ = H.batch(mixtral)
    out = mixtral(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.aux_loss is not None and float(mixtral.config.router_aux_loss_coef * out.aux_loss) > 0.1


def test_mixtral_keeps_its_router_aux_loss():
    """The bug of issue 19.6: patched, out.loss was the CE alone and out.aux_loss None."""
    model = H.tiny_model("mixtral")
    ids, mask, labels, _ = H.batch(model)
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    ce = torch.nn.functional.cross_entropy(want.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert abs(float(want.loss - ce - 0.5 * want.aux_loss)) < 1e-5
    hf.patch(model)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.aux_loss is not None and torch.allclose(got.aux_loss, want.aux_loss)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
    # switched off per call, as the unpatched model allows
    off = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False)
    assert off.aux_loss is None and abs(off.loss.item() - ce.item()) <= 1e-5 * ce.item()


def test_a_family_it_cannot_serve_is_refused_at_patch_time():
    model = H.tiny_model("bart")  # BartForCausalLM computes its own unshifted CrossEntropyLoss
    with pytest.raises(hf.UnsupportedModel, match=r"cannot serve bart \(BartForCausalLM\): its forward computes"):
        hf.patch(model)
    assert not hf.is_patched(model)


def test_a_logit_rule_the_head_does_not_know_is_refused_not_wrong(monkeypatch):
    """A family whose forward does something to its logits that the head table misses: the probe refuses it;
    without the probe the check sees the wrong numbers (the comparison itself can fail)."""
    import importlib

    mh = importlib.import_module("fused_concept.integrations.hf.model_head")
    monkeypatch.setattr(mh, "_HEAD_FACTS", {})  # forget that HyperCLOVAX multiplies by logits_scaling
    with pytest.raises(hf.UnsupportedModel, match=r"hyperclovax .*its logits differ"):
        hf.patch(H.tiny_model("hyperclovax"))
    with pytest.raises(H.WrongNumbers, match="hyperclovax"):
        H.check_family("hyperclovax", objective=False, patch_options=dict(check=False))
