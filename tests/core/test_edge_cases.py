"""Each row of the contract's edge-case table, for the reference and torch paths."""
import pytest
import torch

import fused_concept as fc
from helpers.contract import as_float64, contract_loss, rel_err
from helpers.checks import check_against_contract, make_inputs

IMPLS = ["reference", "torch"]


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_ids_name_tensor_and_value(impl):
    h, w, b, y, c, _ = make_inputs(n=6, v=50, k=3, ignored=(), empty_rows=(), dup=False)
    bad_y = y.clone()
    bad_y[2] = 50
    with pytest.raises(ValueError, match=r"targets.*\b50\b"):
        fc.concept_loss(h, w, bad_y, c, impl=impl)
    bad_y[2] = -7
    with pytest.raises(ValueError, match=r"targets.*-7"):
        fc.concept_loss(h, w, bad_y, c, impl=impl)
    bad_c = c.clone()
    bad_c[1, 2] = 777
    with pytest.raises(ValueError, match=r"concepts.*777"):
        fc.concept_loss(h, w, y, bad_c, impl=impl)
    bad_c[1, 2] = -2
    with pytest.raises(ValueError, match=r"concepts.*-2"):
        fc.concept_loss(h, w, y, bad_c, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicates_and_gold_synonym_count_once(impl):
    h, w, b, y, c, _ = make_inputs(n=8, v=60, k=2, ignored=(), empty_rows=(), dup=False)
    ids = torch.randint(0, 60, y.shape)
    unique = torch.stack([ids, torch.full_like(y, -1)], 1)
    repeated = torch.stack([ids, ids, y, y, -torch.ones_like(y)], 1)  # id twice, gold twice
    a = fc.concept_loss(h, w, y, unique, impl=impl, reduction="none", concept_weight=1.0)
    bb = fc.concept_loss(h, w, y, repeated, impl=impl, reduction="none")
    assert torch.allclose(a, bb, rtol=1e-6, atol=1e-6)
    check_against_contract(impl, h, w, b, y, repeated, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("include_target", [True, False])
def test_row_listing_no_id_has_no_concept_term(impl, include_target):
    h, w, b, y, c, _ = make_inputs(n=8, v=60, k=3, ignored=(), empty_rows=(), dup=False)
    c[2] = -1
    ce_only = fc.concept_loss(h, w, y, bias=b, impl=impl, reduction="none")
    c[3] = torch.tensor([11, 12, 13])
    rows = fc.concept_loss(h, w, y, c, bias=b, impl=impl, reduction="none", include_target=include_target,
                           concept_weight=5.0)
    assert rows[2].item() == pytest.approx(ce_only[2].item(), rel=1e-6)
    assert rows[3].item() > ce_only[3].item() + 1e-3
    # K = 0 is the same as no concepts
    k0 = fc.concept_loss(h, w, y, c[:, :0], bias=b, impl=impl, reduction="none", include_target=include_target)
    assert torch.allclose(k0, ce_only)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_gives_zero_and_zero_grads(impl, reduction):
    h, w, b, y, c, _ = make_inputs(n=6, v=40, k=3)
    y = torch.full_like(y, -100)
    loss, stats = fc.concept_loss(h, w, y, c, bias=b, impl=impl, reduction=reduction, return_stats=True,
                                  z_loss=1e-2)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    loss.sum().backward()
    for t in (h, w, b):
        assert torch.all(t.grad == 0)
    assert torch.all(stats.ce == 0) and torch.all(stats.mass == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_type_and_shape_errors(impl):
    h, w, b, y, c, _ = make_inputs(n=6, v=40, k=3)
    with pytest.raises(TypeError, match="same dtype"):
        fc.concept_loss(h.double(), w, y, c, impl=impl)
    with pytest.raises(TypeError, match="targets.*integer"):
        fc.concept_loss(h, w, y.float(), c, impl=impl)
    with pytest.raises(TypeError, match="concepts.*integer"):
        fc.concept_loss(h, w, y, c.float(), impl=impl)
    with pytest.raises(TypeError, match="bias"):
        fc.concept_loss(h, w, y, c, bias=b.double(), impl=impl)
    with pytest.raises(ValueError, match="weight must be"):
        fc.concept_loss(h, w[None], y, c, impl=impl)
    with pytest.raises(ValueError, match="hidden's last dim"):
        fc.concept_loss(h, w[:, :-1], y, c, impl=impl)
    with pytest.raises(ValueError, match="targets must have"):
        fc.concept_loss(h, w, y[:-1], c, impl=impl)
    with pytest.raises(ValueError, match="concepts must be"):
        fc.concept_loss(h, w, y, c[:-1], impl=impl)
    with pytest.raises(ValueError, match="bias must be"):
        fc.concept_loss(h, w, y, c, bias=b[:-1], impl=impl)
    with pytest.raises(ValueError, match="ntp_weight"):
        fc.concept_loss(h, w, y, c, ntp_weight=torch.ones(5), impl=impl)
    with pytest.raises(ValueError, match="reduction"):
        fc.concept_loss(h, w, y, c, reduction="avg", impl=impl)
    with pytest.raises(ValueError, match="mode"):
        fc.concept_loss(h, w, y, c, mode="hard", impl=impl)
    with pytest.raises(ValueError, match="soft"):
        fc.concept_loss(h, w, y, c, mode="soft", impl=impl)
    with pytest.raises(ValueError, match="concept_probs"):
        fc.concept_loss(h, w, y, c, concept_probs=torch.rand(6, 3), impl=impl)
    with pytest.raises(ValueError, match="softcap"):
        fc.concept_loss(h, w, y, c, softcap=0.0, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        fc.concept_loss(h, w, y, c, impl="cuda")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    h, w, b, y, c, _ = make_inputs(n=12, v=70, d=16, k=3)
    h_t = h.detach().t().contiguous().t().requires_grad_()  # column-major
    w_strided = (torch.randn(70, 40) * 0.4)[:, :32:2].requires_grad_()  # every other column
    assert not h_t.is_contiguous() and not w_strided.is_contiguous()
    opts = dict(margin=0.2, reduction="none", z_loss=1e-3)
    a = fc.concept_loss(h_t, w_strided, y, c, impl=impl, **opts)
    h_c, w_c = h_t.detach().contiguous().requires_grad_(), w_strided.detach().contiguous().requires_grad_()
    bb = fc.concept_loss(h_c, w_c, y, c, impl=impl, **opts)
    assert torch.allclose(a, bb, rtol=1e-6, atol=1e-6)
    up = torch.randn(a.shape)
    for g1, g2 in zip(torch.autograd.grad(a, (h_t, w_strided), up), torch.autograd.grad(bb, (h_c, w_c), up)):
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["hidden-nan", "weight-inf"])
def test_nan_or_inf_input_gives_nan_loss(impl, where):
    h, w, b, y, c, _ = make_inputs(n=6, v=40, k=3, ignored=(), empty_rows=())
    h, w = h.detach().clone(), w.detach().clone()
    if where == "hidden-nan":
        h[1, 3] = float("nan")
    else:
        w[5, 0] = float("inf")
    for opts in (dict(), dict(margin=0.6), dict(reduction="none"), dict(ntp_weight=0.0)):
        loss = fc.concept_loss(h, w, y, c, impl=impl, **opts)
        assert torch.isnan(loss).any(), opts


def test_large_n_times_v_beyond_int32():
    """N*V > 2**31: the torch path's statistics stay exact on rows past the 32-bit boundary."""
    n, v, d = 65_600, 32_771, 4
    assert n * v > 2 ** 31
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    c = torch.randint(0, v, (n, 2), generator=g)
    with torch.no_grad():
        loss, stats = fc.concept_loss(h, w, y, c, impl="torch", reduction="none", return_stats=True)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1])
    h64, w64 = as_float64(h[rows], w)
    ref, ref_stats = contract_loss(h64, w64, y[rows], c[rows], reduction="none")
    assert rel_err(loss[rows], ref) < 1e-5
    assert rel_err(stats.lse[rows], ref_stats["lse"]) < 1e-6
    assert torch.equal(stats.argmax[rows], ref_stats["argmax"])


def test_kernel_options_are_checked_and_reach_the_triton_backward():
    h, w, b, y, c, _ = make_inputs(n=12, v=130, d=16, k=3)
    with pytest.raises(ValueError, match="unknown kernel_options"):
        fc.concept_loss(h, w, y, c, impl="triton", kernel_options={"fast": True})
    with pytest.raises(ValueError, match='impl="triton" only'):
        fc.concept_loss(h, w, y, c, impl="torch", kernel_options={"deterministic": False})
    # the atomic (non-deterministic) backward and the tile filter at 0 still give the contract's gradient
    check_against_contract("triton", h, w, b, y, c, margin=0.05, reduction="sum", tol=1e-4,
                           kernel_options={"deterministic": False, "filter_eps": 0.0})
