"""fused_concept.integrations.hf (fc.hf): patched transformers causal LMs give the loss and gradients of the unpatched model.

References are float64: a float64 copy of the same model gives the logits, and the loss is evaluated
from the contract's formulas on them (cross-entropy over shifted labels; the paper's objective through
tests/helpers/contract.py). The patched model runs in float32 and never forms logits.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fused_concept
import fused_concept.integrations.hf.models
from fused_concept.integrations import hf as hf
from helpers.contract import contract_loss, paper_objective_weights, rel_err

transformers = pytest.importorskip("transformers")

V, D = 300, 32


def _small(config_cls, **extra):
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(extra)
    return config_cls(**common)


def _make(arch, seed=0):
    torch.manual_seed(seed)
    tf = transformers
    if arch == "llama-tied":
        model = tf.LlamaForCausalLM(_small(tf.LlamaConfig, tie_word_embeddings=True))
    elif arch == "llama":
        model = tf.LlamaForCausalLM(_small(tf.LlamaConfig, tie_word_embeddings=False))
    elif arch == "llama-bias":
        model = tf.LlamaForCausalLM(_small(tf.LlamaConfig, tie_word_embeddings=False))
        head = torch.nn.Linear(D, V, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0, 0.5)
        model.lm_head = head
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=1, eos_token_id=2))
    elif arch == "gemma2-softcap":
        # cap small enough that tanh is far from linear on these logits (checked in the test)
        model = tf.Gemma2ForCausalLM(_small(tf.Gemma2Config, head_dim=8, final_logit_softcapping=0.3,
                                            sliding_window=4))
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0, 1.0)
    elif arch == "cohere-scale":
        model = tf.CohereForCausalLM(_small(tf.CohereConfig, logit_scale=2.5))
    elif arch == "granite-scaling":
        model = tf.GraniteForCausalLM(_small(tf.GraniteConfig, logits_scaling=0.4))
    else:
        raise AssertionError(arch)
    return model.float().eval()


ARCHS = ["llama-tied", "llama", "llama-bias", "gpt2", "gemma2-softcap", "cohere-scale", "granite-scaling"]


def _batch(seed=1, b=2, t=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, 4] = -100
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, -2:] = 0  # right padding of the second sequence, ignored in the labels too
    labels[1, -2:] = -100
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _float64_ce(model, ids, mask, labels, num_items=None):
    """Float64 reference: logits of a float64 copy of the unpatched model, cross-entropy of the shifted labels."""
    ref = copy.deepcopy(model).double()
    logits = ref(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.float64
    z, y = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    if num_items is None:
        loss = F.cross_entropy(z, y, ignore_index=-100)
    else:
        loss = F.cross_entropy(z, y, ignore_index=-100, reduction="sum") / num_items
    loss.backward()
    return loss.detach(), _grads(ref), logits.detach()


def _check_grads(model, reference, tol=2e-5):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(names) == set(reference), "every parameter must get a gradient"
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert rel_err(p.grad, reference[n]) < tol, (n, rel_err(p.grad, reference[n]))


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_ce_matches_float64_and_unpatched(arch):
    model = _make(arch)
    ids, mask, labels = _batch()
    ref_loss, ref_grads, ref_logits = _float64_ce(model, ids, mask, labels)

    unpatched = model(input_ids=ids, attention_mask=mask, labels=labels)
    hf.patch(model)
    assert hf.is_patched(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert type(out) is type(unpatched)
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert abs(out.loss.item() - unpatched.loss.item()) <= 1e-5 * abs(unpatched.loss.item())
    out.loss.backward()
    _check_grads(model, ref_grads)

    with_logits = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    assert rel_err(with_logits.logits, ref_logits) < 1e-5

    hf.unpatch(model)
    assert not hf.is_patched(model)
    assert model(input_ids=ids).logits.shape == (2, 9, V)


def test_softcap_and_scales_are_really_applied():
    """Negative control for the architectures above: without the softcap / scale the loss differs."""
    ids, mask, labels = _batch()
    gemma = _make("gemma2-softcap")
    hidden, weight, bias, cap = hf.hidden_and_head(gemma, ids)
    assert cap == pytest.approx(0.3)
    raw = hidden @ weight.t()
    assert (raw - cap * torch.tanh(raw / cap)).abs().max() > 0.5 * cap
    for arch, expected in (("cohere-scale", 2.5), ("granite-scaling", 1 / 0.4)):
        model = _make(arch)
        assert hf.model_head(model).scale == pytest.approx(expected)
        scaled = hf.hidden_and_head(model, ids)[0]
        unscaled = hf.base_model(model)(input_ids=ids).last_hidden_state
        assert torch.allclose(scaled, unscaled * expected)


def test_output_multiplier_and_unpadded_vocab_are_read_from_the_config():
    model = _make("llama")
    model.config.output_multiplier = 3.0
    model.config.logits_scaling = 2.0
    assert hf.model_head(model).scale == pytest.approx(1.5)
    model.config.unpadded_vocab_size = V - 20
    ids, _, _ = _batch()
    hidden, weight, bias, cap = hf.hidden_and_head(model, ids)
    assert weight.shape == (V - 20, D) and weight.data_ptr() == model.lm_head.weight.data_ptr()
    (hidden @ weight.t()).square().sum().backward()
    grad = model.lm_head.weight.grad
    assert grad[: V - 20].abs().sum() > 0 and grad[V - 20 :].abs().sum() == 0


def test_tied_embedding_gets_both_gradients():
    model = _make("llama-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask, labels = _batch()
    hidden, weight, bias, cap = hf.hidden_and_head(model, ids)
    assert weight is model.model.embed_tokens.weight and bias is None and cap is None
    _, ref_grads, _ = _float64_ce(model, ids, mask, labels)
    hf.patch(model)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    name = "model.embed_tokens.weight"
    grads = dict(model.named_parameters())
    assert rel_err(grads[name].grad, ref_grads[name]) < 2e-5
    # the input-embedding part is really in there: rows of tokens only seen as inputs get gradient
    head_only = torch.zeros(V, dtype=torch.bool)
    head_only[ids[:, :-1].reshape(-1)] = True
    assert grads[name].grad[head_only].abs().sum() > 0


def _paper_objective_float64(hidden, weight, bias, cap, targets, concepts, lam, margin, probs=None):
    """The contract's paper objective from contract_loss rows (reduction sum with per-row weights)."""
    loss, _ = contract_loss(hidden, weight, targets, concepts, bias=bias, margin=margin, softcap=cap,
                            mode="marginal" if probs is None else "soft", concept_probs=probs,
                            **paper_objective_weights(targets, concepts, lam))
    return loss


@pytest.mark.parametrize("arch,soft", [("llama-tied", False), ("gemma2-softcap", False), ("llama", True)])
def test_patched_concept_objective_matches_float64(arch, soft):
    model = _make(arch)
    ids, mask, labels = _batch(seed=3)
    g = torch.Generator().manual_seed(4)
    concepts = torch.randint(3, V, (2, 9, 3), generator=g)
    concepts[torch.rand(2, 9, generator=g) < 0.4] = -1  # rows without a concept
    concepts[0, 2, 1] = concepts[0, 2, 0]  # a duplicate
    concepts[0, 3, 2] = labels[0, 3]  # the gold id listed
    concepts[:, :, 2][concepts[:, :, 2] % 2 == 0] = -1  # some pads inside rows
    lam, margin = 0.3, 0.6
    probs = torch.rand(concepts.shape, generator=g) * (concepts != -1) if soft else None

    ref = copy.deepcopy(model).double()
    hidden, weight, bias, cap = hf.hidden_and_head(ref, ids, attention_mask=mask)
    ref_loss = _paper_objective_float64(hidden[:, :-1], weight, bias, cap, labels[:, 1:], concepts[:, 1:], lam, margin,
                                        None if probs is None else probs[:, 1:].double())
    ref_loss.backward()
    ref_grads = _grads(ref)

    hf.patch(model, lam=lam, margin=margin)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, concepts=concepts, concept_probs=probs)
    assert out.logits is None
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    out.loss.backward()
    _check_grads(model, ref_grads)

    # the concept term is really there: plain CE is a different number
    plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(plain.item() - out.loss.item()) > 1e-3
    if soft:
        hf.patch(model, mode="marginal")
        with pytest.raises(ValueError, match='concept_probs need mode="soft"'):
            model(input_ids=ids, labels=labels, concepts=concepts, concept_probs=probs)


def test_patched_model_compiles_fullgraph():
    """torch.compile(fullgraph=True, which fails on any graph break) of the patched model's loss: the eager loss and
    gradients (bitwise: AOTAutograd runs the same ops), and the float64 objective."""
    model = _make("llama")
    ids, mask, labels = _batch(seed=6)
    concepts = torch.randint(3, V, (2, 9, 2), generator=torch.Generator().manual_seed(7))
    concepts[:, ::3] = -1
    ref = copy.deepcopy(model).double()
    hidden, weight, bias, cap = hf.hidden_and_head(ref, ids, attention_mask=mask)
    _paper_objective_float64(hidden[:, :-1], weight, bias, cap, labels[:, 1:], concepts[:, 1:], 0.5, None).backward()
    hf.patch(model, lam=0.5, margin=None)

    def loss_fn(ids_, mask_, labels_, concepts_):
        return model(input_ids=ids_, attention_mask=mask_, labels=labels_, concepts=concepts_).loss

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(ids, mask, labels, concepts)
    compiled.backward()
    got = _grads(model)
    model.zero_grad()
    eager = loss_fn(ids, mask, labels, concepts)
    eager.backward()
    assert torch.equal(compiled, eager)
    for n, p in model.named_parameters():
        assert torch.equal(got[n], p.grad), n
    _check_grads(model, _grads(ref))


def test_num_items_in_batch_and_tuple_output():
    model = _make("llama")
    ids, mask, labels = _batch()
    ref_loss, ref_grads, _ = _float64_ce(model, ids, mask, labels, num_items=23)
    hf.patch(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(23))
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    out.loss.backward()
    _check_grads(model, ref_grads)
    as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=23, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0], out.loss.detach())


def test_shift_labels_are_used_as_given():
    model = _make("gpt2")
    ids, mask, labels = _batch()
    ref_loss, ref_grads, _ = _float64_ce(model, ids, mask, labels)
    hf.patch(model)
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    out = model(input_ids=ids, attention_mask=mask, shift_labels=shifted)
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    out.loss.backward()
    _check_grads(model, ref_grads)
    with pytest.raises(ValueError, match="labels has shape"):
        model(input_ids=ids, labels=labels[:, :5])


def test_shifted_concepts_are_refused_with_the_expected_alignment():
    """README's first API block once passed concepts already shifted ([B, T-1, K]) with labels=input_ids:
    the error names the shape given and the alignment expected, not a shape the user never passed."""
    model = hf.patch(_make("gpt2"))
    ids, mask, labels = _batch()
    concepts = torch.randint(0, 50, (2, 9, 3))
    with pytest.raises(ValueError, match=r"concepts has shape \(2, 8, 3\).*aligned with labels: \(2, 9\)"):
        model(input_ids=ids, attention_mask=mask, labels=labels, concepts=concepts[:, 1:])
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels, concepts=concepts).loss)


def test_without_labels_is_the_original_forward():
    model = _make("gpt2")
    ids, mask, _ = _batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    generated = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    hf.patch(model)
    got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert torch.equal(model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0), generated)
    with pytest.raises(ValueError, match="concepts were given without labels"):
        model(input_ids=ids, concepts=torch.full((2, 9, 1), -1))
    with pytest.raises(TypeError, match="unknown loss options"):
        hf.patch(model, lamda=0.5)


def test_check_head_detects_an_unsupported_forward():
    model = _make("llama")
    assert hf.check_head(model) < 1e-5
    model.config.logit_scale = 3.0  # claims a scale the Llama forward does not apply
    with pytest.raises(ValueError, match="cannot reproduce the logits of LlamaForCausalLM"):
        hf.check_head(model)
    del model.config.logit_scale
    model.config.unpadded_vocab_size = V - 1  # claims padding rows the forward does not slice off
    with pytest.raises(ValueError, match="the head gives"):
        hf.check_head(model)
    gpt2 = _make("gpt2").train()  # dropout on: check_head still compares deterministic passes
    assert hf.check_head(gpt2) < 1e-5 and gpt2.training


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = _make("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # make the adapter do something
    ids, mask, labels = _batch()
    expected = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    want = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
    lora.zero_grad()
    hf.patch(lora)
    out = lora(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * expected.item()
    out.loss.backward()
    for n, p in lora.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, want[n]) < 1e-4, n


def test_load_model_dispatch(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(fused_concept.integrations.hf.models, "_load_gguf", lambda path, **kw: seen.append(path) or ("model", "tok"))
    assert hf.load_model(None) == ("model", "tok")
    assert hf.load_model("default") == ("model", "tok")
    assert seen == [hf.default_gguf_path()] * 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_model(str(tmp_path / "missing.gguf"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    hf.load_model(str(gguf))
    assert seen[-1] == str(gguf)


# ----------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = hf.load_default_model(tokenizer=False)
    assert tokenizer is None
    return model


@torch.no_grad()
def test_smollm2_patched_equals_unpatched(smollm2):
    """The real model: fused CE and fused paper objective against the unpatched model's own logits."""
    model = smollm2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=g)
    labels = ids.clone()
    labels[0, 5] = -100
    concepts = torch.randint(3, model.config.vocab_size, (1, 12, 2), generator=g)
    concepts[0, ::3] = -1
    try:
        expected = model(input_ids=ids, labels=labels)
        hf.patch(model, lam=0.5, margin=None)
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None
        assert abs(out.loss.item() - expected.loss.item()) <= 2e-5 * expected.loss.item()
        objective = model(input_ids=ids, labels=labels, concepts=concepts).loss
    finally:
        hf.unpatch(model)
    logits = expected.logits[0, :-1].double()
    y, c = labels[0, 1:], concepts[0, 1:]
    lse = torch.logsumexp(logits, -1)
    valid = y != -100
    ce = lse - logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
    content = valid & (c != -1).any(-1)
    cl = torch.stack([lse[i] - torch.logsumexp(logits[i, sorted(set(c[i][c[i] != -1].tolist()) | {int(y[i])})], 0)
                      if content[i] else lse[i] * 0 for i in range(len(y))])
    want = (ce[valid & ~content].sum() + 0.5 * ce[content].sum()) / valid.sum() + 0.5 * cl[content].mean()
    assert abs(objective.item() - want.item()) <= 2e-5 * want.item()
