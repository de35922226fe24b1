"""The front door (fused_concept/loss.py): the reference and torch paths against the float64 contract
(tests/helpers/contract.py)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fused_concept as fc
from fused_concept.backends import torch_chunked as _torch_path
from helpers.checks import check_against_contract, make_inputs
from helpers.contract import as_float64, contract_loss, rel_err

IMPLS = ["reference", "torch"]


# every (mode, margin, include_target, reduction); the remaining options rotate so each is seen on and off
CORE_CASES = list(itertools.product(["marginal", "soft"], [None, 0.6], [True, False], ["mean", "sum", "none"]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(len(CORE_CASES)))
def test_every_option_matches_contract(impl, case):
    mode, margin, include_target, reduction = CORE_CASES[case]
    per_row = case % 2 == 0
    h, w, b, y, c, p = make_inputs(seed=100 + case, bias=case % 3 != 0, probs=mode == "soft")
    n = y.shape[0]
    g = torch.Generator().manual_seed(case)
    ntp = torch.rand(n, generator=g) + 0.5 if per_row else 0.7
    cw = torch.rand(n, generator=g) + 0.5 if per_row else 1.3
    if margin is not None:
        margin = 0.05  # the random model puts little mass on sets: cut some rows off, keep others
    check_against_contract(impl, h, w, b, y, c, p, mode=mode, margin=margin, include_target=include_target,
                           reduction=reduction, ntp_weight=ntp, concept_weight=cw,
                           softcap=[None, 5.0, 30.0][case % 3], z_loss=[0.0, 1e-3][(case // 3) % 2])


@pytest.mark.parametrize("impl", IMPLS)
def test_hinge_splits_rows(impl):
    """A margin that sits between rows' masses must switch some concept terms off and keep others."""
    h, w, b, y, c, _ = make_inputs(seed=5, bias=False)
    _, stats = fc.concept_loss(h, w, y, c, impl=impl, return_stats=True)
    masses = stats.mass[stats.mass > 0]
    margin = float(masses.median())
    assert (masses < margin).any() and (masses >= margin).any()
    check_against_contract(impl, h, w, None, y, c, margin=margin, reduction="sum")


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_and_module(impl):
    h, w, b, y, c, _ = make_inputs(n=36, seed=7)
    h3 = h.detach().reshape(4, 9, -1).requires_grad_()
    y3, c3 = y.reshape(4, 9), c.reshape(4, 9, -1)
    weights = torch.rand(4, 9) + 0.1
    check_against_contract(impl, h3, w, b, y3, c3, ntp_weight=weights, concept_weight=2.0 * weights,
                           reduction="none", margin=0.1)
    module = fc.ConceptLoss(margin=0.1, impl=impl, reduction="sum", z_loss=1e-4)
    got = module(h3, w, y3, c3, bias=b)
    want = fc.concept_loss(h3, w, y3, c3, bias=b, margin=0.1, impl=impl, reduction="sum", z_loss=1e-4)
    assert torch.equal(got, want)
    assert "margin=0.1" in repr(module)


def test_torch_path_chunking_matches_single_chunk(monkeypatch):
    h, w, b, y, c, _ = make_inputs(seed=9)
    monkeypatch.setattr(_torch_path, "CHUNK_ELEMENTS", 5 * w.shape[0])  # 5 rows per chunk, ragged last chunk
    check_against_contract("torch", h, w, b, y, c, margin=0.05, z_loss=1e-3, reduction="mean")
    check_against_contract("torch", h, w, b, y, c, margin=0.05, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_gives_only_hidden_grad(impl):
    h, w, b, y, c, _ = make_inputs(seed=11)
    w = w.detach()
    b = b.detach()
    check_against_contract(impl, h, w, b, y, c, reduction="mean")
    loss = fc.concept_loss(h, w, y, c, bias=b, impl=impl)
    loss.backward()
    assert h.grad is not None and w.grad is None and b.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
    h, w, b, y, c, _ = make_inputs(seed=12, dtype=torch.bfloat16)
    check_against_contract(impl, h, w, b, y, c, tol=1e-2, grad_tol=2e-2, margin=0.05, reduction="sum")


def test_gradcheck_float64_torch_path():
    # the first backward hands over the gradient formed in the forward sweep, later ones (gradcheck
    # runs backward twice) recompute it: equal up to float64 rounding, hence nondet_tol
    g = torch.Generator().manual_seed(3)
    n, v, d, k = 7, 13, 5, 3
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    y[2] = -100
    c = torch.randint(0, v, (n, k), generator=g)
    c[1] = -1
    c[0, 1] = -1
    p = torch.rand(n, k, generator=g, dtype=torch.float64)
    for opts in (dict(reduction="mean", z_loss=0.01, softcap=3.0),
                 dict(reduction="none", ntp_weight=0.3, concept_weight=torch.rand(n, generator=g)),
                 dict(reduction="sum", mode="soft", concept_probs=p, include_target=False),
                 dict(reduction="sum", margin=0.99)):
        fn = lambda h_, w_, b_: fc.concept_loss(h_, w_, y, c, bias=b_, impl="torch", **opts)
        assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5,
                                         nondet_tol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_plain_ce_equals_torch_cross_entropy(impl, reduction):
    h, w, b, y, _, _ = make_inputs(seed=21)
    got = fc.concept_loss(h, w, y, bias=b, impl=impl, reduction=reduction)
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, w, b))
    want = F.cross_entropy(F.linear(h2, w2, b2), y, reduction=reduction)
    assert rel_err(got, want) < 1e-5
    up = torch.randn(got.shape)
    for a, bb in zip(torch.autograd.grad(got, (h, w, b), up), torch.autograd.grad(want, (h2, w2, b2), up)):
        assert rel_err(a, bb) < 1e-5


def paper_objective_transcribed(hidden, weight, targets, concepts, lam, margin, ignore_index=-100):
    """Literal transcription of the paper's objective: fp32 softmax over explicit logits, gather the
    set mass (gold included), hinge at the margin, mix with the next-token loss."""
    logits = (hidden @ weight.t()).float()
    probs = torch.softmax(logits, dim=-1)
    valid = targets != ignore_index
    content = valid & (concepts != -1).any(-1)
    ce = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    set_mask = torch.zeros_like(probs, dtype=torch.bool)
    for i in range(len(targets)):
        if content[i]:
            ids = [int(t) for t in concepts[i] if t != -1] + [int(targets[i])]
            set_mask[i, ids] = True
    mass = (probs * set_mask).sum(-1)
    active = (mass < margin).float().detach()
    concept_term = -torch.log(mass.clamp(min=1e-30)) * active
    n_valid = valid.sum().clamp(min=1)
    ntp = (ce * valid * torch.where(content, 1 - lam, 1.0)).sum() / n_valid
    if content.any():
        return ntp + lam * (concept_term * content).sum() / content.sum()
    return ntp


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_concept_objective_equals_paper_formula(impl, lam):
    h, w, _, y, c, _ = make_inputs(seed=31, bias=False)
    got = fc.concept_objective(h, w, y, c, lam=lam, margin=0.05, impl=impl)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = paper_objective_transcribed(h2, w2, y, c, lam, 0.05)
    assert rel_err(got, want) < 1e-5
    for a, bb in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h2, w2))):
        assert rel_err(a, bb) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_concept_objective_edge_counts(impl):
    h, w, _, y, c, _ = make_inputs(n=10, seed=33, bias=False, ignored=(), empty_rows=(), dup=False)
    c_none = torch.full_like(c, -1)
    got = fc.concept_objective(h, w, y, c_none, impl=impl)  # T empty: the concept term vanishes
    assert rel_err(got, F.cross_entropy(h @ w.t(), y)) < 1e-5
    y_all_ignored = torch.full_like(y, -100)
    got = fc.concept_objective(h, w, y_all_ignored, c, impl=impl)
    assert got.item() == 0.0
    # explicit global counts scale the terms exactly
    base = fc.concept_objective(h, w, y, c, impl=impl, lam=0.5, margin=None)
    half = fc.concept_objective(h, w, y, c, impl=impl, lam=0.5, margin=None, num_valid=20,
                                num_content=2 * int(((c != -1).any(-1)).sum()))
    assert rel_err(half, base / 2) < 1e-6


def test_repeated_backward_recomputes_same_gradient():
    """The torch path hands its forward-formed gradient to the first backward; a retained graph's
    second backward (and a non-unit upstream) must give the same numbers."""
    h, w, b, y, c, _ = make_inputs(seed=41)
    loss = fc.concept_loss(h, w, y, c, bias=b, impl="torch", margin=0.05, z_loss=1e-3)
    first = torch.autograd.grad(loss, (h, w, b), torch.tensor(2.5), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w, b), torch.tensor(2.5))
    for a, bb in zip(first, second):
        assert rel_err(a, bb) < 1e-6
    h64, w64, b64 = as_float64(h, w, b)
    ref, _ = contract_loss(h64, w64, y, c, bias=b64, margin=0.05, z_loss=1e-3)
    for a, bb in zip(first, torch.autograd.grad(2.5 * ref, (h64, w64, b64))):
        assert rel_err(a, bb) < 1e-4
