"""Shared test inputs and the standard check against the float64 contract (no test file imports another)."""
import torch

import fused_concept as fc
from helpers.contract import as_float64, contract_loss, rel_err


def make_inputs(n=37, v=1001, d=48, k=5, *, seed=0, dtype=torch.float32, bias=True, ignored=(3, 17),
                empty_rows=(5,), dup=True, probs=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.4).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        if i < n:
            y[i] = -100
    c = torch.randint(0, v, (n, k), generator=g)
    c[torch.rand(n, k, generator=g) < 0.3] = -1
    for i in empty_rows:
        if i < n:
            c[i] = -1
    if dup and k >= 3 and n > 8:
        c[7, 1] = c[7, 0]  # duplicate id
        c[8, 2] = y[8]  # synonym equal to the gold id
        c[8, 0] = 0  # id 0 is a valid id (not a pad)
    p = torch.rand(n, k, generator=g) if probs else None
    return h, w, b, y, c, p


def check_against_contract(impl, h, w, b, y, c, p=None, tol=2e-5, grad_tol=None, kernel_options=None, loss_fn=None,
                           **opts):
    """The loss, every statistic and the gradients of `loss_fn` (default `concept_loss`) with `impl` against
    the float64 contract, on the same inputs."""
    grad_tol = grad_tol or tol * 5
    loss_fn = loss_fn or fc.concept_loss
    loss, stats = loss_fn(h, w, y, c, bias=b, concept_probs=p, impl=impl, return_stats=True,
                                  kernel_options=kernel_options, **opts)
    h64, w64, b64 = as_float64(h, w, b)
    p64 = None if p is None else p.double()
    ref, ref_stats = contract_loss(h64, w64, y, c, bias=b64, concept_probs=p64, **opts)
    assert torch.isfinite(loss).all()
    assert rel_err(loss, ref) < tol, (impl, opts, float(loss.sum()), float(ref.sum()))
    assert rel_err(stats.lse, ref_stats["lse"]) < tol
    assert rel_err(stats.ce, ref_stats["ce"]) < tol
    assert (stats.mass.double() - ref_stats["mass"]).abs().max() < tol * 10
    assert torch.equal(stats.argmax, ref_stats["argmax"])
    upstream = torch.randn(loss.shape, dtype=torch.float64) if loss.dim() else torch.tensor(1.7, dtype=torch.float64)
    params = [t for t in (h, w, b) if t is not None and t.requires_grad]
    params64 = [t for t in (h64, w64, b64) if t is not None and t.requires_grad]
    got = torch.autograd.grad(loss, params, upstream.to(loss.dtype))
    want = torch.autograd.grad(ref, params64, upstream)
    for name, g_got, g_want in zip("hwb", got, want):
        assert g_got.dtype == dict(h=h, w=w, b=b)[name].dtype
        assert rel_err(g_got, g_want) < grad_tol, (impl, name, opts, rel_err(g_got, g_want))
