"""Held-out metrics from the fused statistics, checked against float64 explicit logits.

The oracle forms every logit in float64 and applies the definitions of the metrics registry
(fused_concept/training/metrics.py): global / content perplexity, mean concept mass, concept accuracy
(argmax in the set, gold included) and token accuracy.
"""
import math

import pytest
import torch

from fused_concept import concept_loss
from fused_concept.training.evaluate import evaluate, metric_sums, metrics_from_sums


def _oracle_metrics(logits64, targets, concepts, ignore_index=-100):
    """Metrics from explicit float64 logits [N, V], targets [N], concepts [N, K]."""
    ce_valid, ce_content, ce_other, mass_content = [], [], [], []
    token_hits = concept_hits = 0
    for i in range(logits64.shape[0]):
        y = int(targets[i])
        if y == ignore_index:
            continue
        z = logits64[i]
        lse = torch.logsumexp(z, 0)
        ce = float(lse - z[y])
        top = int(torch.argmax(z))
        ce_valid.append(ce)
        token_hits += top == y
        listed = {int(t) for t in concepts[i] if int(t) != -1}
        if listed:
            members = sorted(listed | {y})
            mass_content.append(float(torch.exp(torch.logsumexp(z[members], 0) - lse)))
            ce_content.append(ce)
            concept_hits += top in members
        else:
            ce_other.append(ce)
    return {
        "heldout.perplexity": math.exp(sum(ce_valid) / len(ce_valid)),
        "heldout.content_perplexity": math.exp(sum(ce_content) / len(ce_content)),
        "heldout.noncontent_perplexity": math.exp(sum(ce_other) / len(ce_other)),
        "heldout.concept_mass": sum(mass_content) / len(mass_content),
        "heldout.concept_accuracy": concept_hits / len(ce_content),
        "heldout.token_accuracy": token_hits / len(ce_valid),
        "heldout.tokens": len(ce_valid),
        "heldout.content_tokens": len(ce_content),
    }


def _assert_metrics_close(got, want, rel=1e-5):
    for key in ("heldout.perplexity", "heldout.content_perplexity", "heldout.noncontent_perplexity",
                "heldout.concept_mass"):
        assert got[key] == pytest.approx(want[key], rel=rel), key
    for key in ("heldout.concept_accuracy", "heldout.token_accuracy", "heldout.tokens", "heldout.content_tokens"):
        assert got[key] == want[key], key


def test_metric_sums_match_explicit_logits():
    g = torch.Generator().manual_seed(11)
    n, d, v, k = 40, 16, 50, 4
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g)
    logits64 = hidden.double() @ weight.double().t()
    top = logits64.argmax(dim=1)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::3] = top[::3]  # some token hits
    targets[5] = targets[17] = -100
    concepts = torch.randint(0, v, (n, k), generator=g)
    concepts[torch.rand(n, k, generator=g) < 0.3] = -1
    concepts[1::4, 0] = top[1::4]  # some concept hits that are not token hits
    concepts[2] = targets[2]  # gold listed (duplicated): counted once
    concepts[7:12] = -1  # rows without a concept set: not content
    _, stats = concept_loss(hidden, weight, targets, concepts, reduction="sum", return_stats=True)
    got = metrics_from_sums(metric_sums(stats, targets, concepts))
    want = _oracle_metrics(logits64, targets, concepts)
    # the oracle exercises both kinds of hit
    assert 0 < want["heldout.token_accuracy"] < want["heldout.concept_accuracy"] < 1
    _assert_metrics_close(got, want)


def test_metrics_undefined_without_content_rows():
    sums = torch.tensor([4.0, 8.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    metrics = metrics_from_sums(sums)
    assert metrics["heldout.perplexity"] == pytest.approx(math.exp(2.0))
    assert metrics["heldout.token_accuracy"] == 0.25
    assert math.isnan(metrics["heldout.content_perplexity"]) and math.isnan(metrics["heldout.concept_mass"])


def _tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init, so argmax hits happen
        model.lm_head.weight.mul_(40.0)
    return model.eval()


def test_evaluate_model_matches_explicit_logits():
    model = _tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (5, 12), generator=g)
    concepts = torch.randint(0, 96, (5, 12, 3), generator=g)
    concepts[torch.rand(5, 12, 3, generator=g) < 0.4] = -1
    concepts[:, ::5] = -1
    with torch.no_grad():
        logits64 = (model.model(ids[:, :-1]).last_hidden_state.double()
                    @ model.lm_head.weight.double().t())
    want = _oracle_metrics(logits64.reshape(-1, 96), ids[:, 1:].reshape(-1), concepts[:, 1:].reshape(-1, 3))
    assert want["heldout.content_tokens"] < want["heldout.tokens"] == 55
    for batch_size in (1, 5):  # the sums combine batches exactly
        rows = {}
        got = evaluate(model, ids, concepts, batch_size=batch_size, impl="torch", rows=rows)
        _assert_metrics_close(got, want)
        # per-row NLL and content flags, in sequence order, for the paired bootstrap
        lse = torch.logsumexp(logits64, dim=-1)
        nll = (lse - logits64.gather(-1, ids[:, 1:, None])[..., 0]).reshape(-1)
        torch.testing.assert_close(torch.tensor(rows["nll"], dtype=torch.float64), nll, rtol=1e-5, atol=1e-5)
        assert rows["content"] == (concepts[:, 1:] != -1).any(dim=-1).reshape(-1).tolist()
