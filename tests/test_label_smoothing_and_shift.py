"""Peer parity at the front door: `label_smoothing` (torch.nn.CrossEntropyLoss's, for the token term) and
`shift=True` (cut-cross-entropy's unshifted inputs), on every implementation, against the float64
contract (tests/helpers/contract.py), against torch's own cross-entropy, and against explicit slicing."""
import pytest
import torch
import torch.nn.functional as F

import fused_concept as fc
from helpers.checks import make_inputs
from helpers.contract import rel_err
from helpers.impls import IMPLS, check_contract, loss_fn, one_rank_group

# Triton's strategies: the default chunked recompute, the row / column sweeps, the atomic tiles, row chunks
TRITON_PASSES = (None, dict(strategy="recompute_sweep"), dict(deterministic=False),
                 dict(strategy="rows", chunk_rows=16))


@pytest.fixture(scope="module", autouse=True)
def group(tmp_path_factory):
    with one_rank_group(tmp_path_factory.mktemp("group")):
        yield


SMOOTHING_CASES = [
    dict(label_smoothing=0.1, reduction="mean"),
    dict(label_smoothing=0.3, reduction="none", softcap=6.0, z_loss=1e-3, margin=0.05),
    dict(label_smoothing=1.0, reduction="sum", mode="soft", ntp_weight=0.4, concept_weight=1.5),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(len(SMOOTHING_CASES)))
def test_label_smoothing_matches_contract(impl, case):
    opts = SMOOTHING_CASES[case]
    h, w, b, y, c, p = make_inputs(seed=300 + case, probs=opts.get("mode") == "soft")
    check_contract(impl, h, w, b, y, c, p, **opts)


@pytest.mark.parametrize("kernel_options", TRITON_PASSES, ids=["chunked", "sweep", "atomic", "rows"])
def test_label_smoothing_on_every_triton_backward(kernel_options):
    h, w, b, y, c, _ = make_inputs(seed=310)
    check_contract("triton", h, w, b, y, c, kernel_options=kernel_options, label_smoothing=0.2, softcap=9.0,
                   reduction="sum")
    w.requires_grad_(False)  # frozen head: the row sweep alone
    check_contract("triton", h, w, b, y, c, kernel_options=kernel_options, label_smoothing=0.2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_equals_torch_cross_entropy(impl, reduction):
    h, w, b, y, _, _ = make_inputs(seed=320)
    got = loss_fn(impl)(h, w, y, bias=b, reduction=reduction, label_smoothing=0.25)
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, w, b))
    want = F.cross_entropy(F.linear(h2, w2, b2), y, reduction=reduction, label_smoothing=0.25)
    assert rel_err(got, want) < 1e-5
    up = torch.randn(got.shape)
    for a, bb in zip(torch.autograd.grad(got, (h, w, b), up), torch.autograd.grad(want, (h2, w2, b2), up)):
        assert rel_err(a, bb) < 1e-5


def test_label_smoothing_reports_the_gold_nll_and_changes_the_loss():
    h, w, b, y, c, _ = make_inputs(seed=330)
    plain, s0 = fc.concept_loss(h, w, y, c, bias=b, impl="torch", return_stats=True)
    smooth, s1 = fc.concept_loss(h, w, y, c, bias=b, impl="torch", return_stats=True, label_smoothing=0.2)
    assert torch.equal(s0.ce, s1.ce)
    assert abs(float((smooth - plain).detach())) > 1e-3


def test_gradcheck_float64_label_smoothing_and_shift():
    h, w, b, y, c, _ = make_inputs(n=8, v=13, d=3, k=3, seed=340, dtype=torch.float64, ignored=(2,),
                                   empty_rows=(), dup=False)
    h3 = h.detach().reshape(2, 4, 3).requires_grad_()
    fn = lambda h_, w_, b_: fc.concept_loss(h_, w_, y.reshape(2, 4), c.reshape(2, 4, 3), bias=b_, impl="torch",
                                            label_smoothing=0.3, shift=True, softcap=4.0, margin=0.9)
    assert torch.autograd.gradcheck(fn, (h3, w, b), eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=1e-12)


def _sequences(seed, probs=False):
    h, w, b, y, c, p = make_inputs(n=36, seed=seed, probs=probs)
    h3 = h.detach().reshape(4, 9, -1).requires_grad_()
    return h3, w, b, y.reshape(4, 9), c.reshape(4, 9, -1), None if p is None else p.reshape(4, 9, -1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift_equals_explicit_slicing(impl, reduction):
    h, w, b, y, c, p = _sequences(350, probs=True)
    weights = torch.rand(4, 9) + 0.5
    opts = dict(bias=b, reduction=reduction, return_stats=True, margin=0.3, ntp_weight=weights)
    got, stats = loss_fn(impl)(h, w, y, c, shift=True, **opts)
    grads = torch.autograd.grad(got.sum(), (h, w, b))
    h2 = h.detach().clone().requires_grad_()
    sliced = dict(opts, ntp_weight=weights[:, 1:])
    want, want_stats = loss_fn(impl)(h2[:, :-1], w, y[:, 1:], c[:, 1:], **sliced)
    want_grads = torch.autograd.grad(want.sum(), (h2, w, b))
    assert got.shape == want.shape and rel_err(got, want) < 1e-6
    assert stats.lse.shape == (4, 8) and rel_err(stats.lse, want_stats.lse) < 1e-6
    assert torch.equal(stats.argmax, want_stats.argmax)
    for a, bb in zip(grads, want_grads):
        assert rel_err(a, bb) < 1e-6
    assert torch.count_nonzero(grads[0][:, -1]) == 0  # the last position predicts nothing


@pytest.mark.parametrize("impl", IMPLS)
def test_shift_matches_contract_with_soft_sets(impl):
    h, w, b, y, c, p = _sequences(360, probs=True)
    check_contract(impl, h, w, b, y, c, p, shift=True, mode="soft", reduction="sum", label_smoothing=0.1)


def test_shift_through_the_module_and_the_objective():
    h, w, b, y, c, _ = _sequences(370)
    module = fc.ConceptLoss(shift=True, label_smoothing=0.1, impl="torch")
    want = fc.concept_loss(h, w, y, c, bias=b, shift=True, label_smoothing=0.1, impl="torch")
    assert torch.equal(module(h, w, y, c, bias=b), want)
    got = fc.concept_objective(h, w, y, c, shift=True, impl="torch")
    assert rel_err(got, fc.concept_objective(h[:, :-1], w, y[:, 1:], c[:, 1:], impl="torch")) < 1e-6


def test_shift_on_one_position_sequences_predicts_nothing():
    h, w, b, y, c, _ = make_inputs(n=3, seed=380)
    h1 = h.detach().reshape(3, 1, -1).requires_grad_()
    loss = fc.concept_loss(h1, w, y.reshape(3, 1), c.reshape(3, 1, -1), bias=b, shift=True, impl="torch")
    assert loss.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(loss, h1)[0]) == 0
    rows = fc.concept_loss(h1, w, y.reshape(3, 1), c.reshape(3, 1, -1), shift=True, reduction="none")
    assert rows.shape == (3, 0)
