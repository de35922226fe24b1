"""Strategy "rows" of the Triton path (kernel_options={"strategy": "rows"}: row chunks of logits from the
matrix product, one `_chunk_rows_kernel` per chunk, the gradient formed in the forward) through the public
API, against the float64 contract (tests/helpers/contract.py): every option of the loss, both launch modes
(FUSED in the forward of "mean" / "sum"; GIVEN in the recomputing backward of "none" and of a second
backward), several chunks with a ragged last one, the non-finite policy, N = 0, torch.compile, and the
d_weight accumulation over many chunks against the torch path's. Triton's interpreter on the CPU; the
backend-level cases with a vocabulary shard are in test_triton_interpret.py (strategy "rows" rows of CASES).
"""
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("the contract helpers take CPU tensors (the GPU runs test_triton_interpret.py)",
                allow_module_level=True)

import fused_concept as fc  # noqa: E402
from fused_concept.backends import triton_rows  # noqa: E402
from helpers.checks import check_against_contract, make_inputs  # noqa: E402
from helpers.contract import as_float64, contract_loss, rel_err  # noqa: E402

NAN, INF = float("nan"), float("inf")
ROWS = {"strategy": "rows", "chunk_rows": 16}  # 37 rows: chunks of 16, 16 and 5


def rows_options(**extra):
    return dict(ROWS, **extra)


CASES = [
    dict(mode="marginal", reduction="mean"),
    dict(mode="marginal", margin=0.6, reduction="none", include_target=False),
    dict(mode="marginal", margin=0.3, reduction="sum", softcap=8.0, z_loss=1e-4),
    dict(mode="soft", reduction="sum", z_loss=1e-3),
    dict(mode="soft", margin=0.6, reduction="mean", softcap=12.0),
    dict(mode="soft", reduction="none", label_smoothing=0.2, softcap=6.0),
    dict(mode="marginal", reduction="mean", label_smoothing=0.1, margin=0.5),
    dict(mode="marginal", reduction="sum", ntp_weight=0.3, concept_weight=2.0),
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_rows_strategy_matches_contract(opts):
    """Ignored rows, a row without concepts, a duplicate id and a synonym equal to the gold id are in every
    case (make_inputs); bias on; three chunks, the last one ragged."""
    h, w, b, y, c, p = make_inputs(seed=len(str(opts)), probs=opts.get("mode") == "soft")
    check_against_contract("triton", h, w, b, y, c, p if opts["mode"] == "soft" else None,
                           kernel_options=ROWS, **opts)


def test_per_row_weights_and_one_chunk():
    h, w, b, y, c, _ = make_inputs(seed=21)
    g = torch.Generator().manual_seed(22)
    alpha, beta = torch.rand(37, generator=g), torch.rand(37, generator=g) * 2
    for options in (ROWS, {"strategy": "rows"}):  # three chunks; one chunk (the default budget)
        check_against_contract("triton", h, w, b, y, c, kernel_options=options, ntp_weight=alpha,
                               concept_weight=beta, margin=0.4, reduction="sum")


def test_frozen_head_and_trainable_bias_alone():
    h, w, b, y, c, _ = make_inputs(seed=23)
    w.requires_grad_(False)
    check_against_contract("triton", h, w, b, y, c, kernel_options=ROWS, margin=0.5)
    h.requires_grad_(False)
    check_against_contract("triton", h, w, b, y, c, kernel_options=ROWS, softcap=4.0)
    b.requires_grad_(False)
    h.requires_grad_(True)
    check_against_contract("triton", h, w, b, y, c, kernel_options=ROWS, reduction="none")


def _bf16_check(h, w, b, y, c, **opts):
    """check_against_contract's numbers at bf16 tolerances (the logits are rounded to bf16 by the product, so
    a near-tie may pick another argmax: the chosen id's float64 logit must be within the rounding)."""
    loss, stats = fc.concept_loss(h, w, y, c, bias=b, impl="triton", return_stats=True, kernel_options=ROWS, **opts)
    h64, w64, b64 = as_float64(h, w, b)
    ref, ref_stats = contract_loss(h64, w64, y, c, bias=b64, **opts)
    assert rel_err(loss, ref) < 1e-2 and rel_err(stats.lse, ref_stats["lse"]) < 1e-2
    z64 = h64.detach() @ w64.detach().t() + b64.detach()
    picked = z64.gather(1, stats.argmax[:, None])[:, 0]
    assert float((z64.max(1).values - picked).max()) < 0.1
    params = [t for t in (h, w, b) if t.requires_grad]
    upstream = torch.randn(loss.shape) if loss.dim() else torch.tensor(0.9)
    got = torch.autograd.grad(loss, params, upstream.to(loss.dtype))
    want = torch.autograd.grad(ref, [t for t in (h64, w64, b64) if t.requires_grad], upstream.double())
    for g_got, g_want, t in zip(got, want, params):
        assert g_got.dtype == t.dtype and rel_err(g_got, g_want) < 2e-2


def test_bfloat16_trainable_and_frozen():
    h, w, b, y, c, _ = make_inputs(seed=3, dtype=torch.bfloat16)
    _bf16_check(h, w, b, y, c, margin=0.05, reduction="sum")
    _bf16_check(h, w, b, y, c, reduction="none", softcap=10.0)
    w.requires_grad_(False)
    b.requires_grad_(False)
    _bf16_check(h, w, b, y, c, reduction="mean", label_smoothing=0.1)


def test_the_forward_forms_the_gradient_and_a_second_backward_recomputes(monkeypatch):
    """mean / sum: the forward's FUSED launches give the gradient, the backward only scales it (no second
    pass over the logits); with retain_graph a second backward recomputes (GIVEN launches) and adds the same."""
    h, w, b, y, c, _ = make_inputs(seed=31)
    calls = []
    original = triton_rows.rows_shard_grads
    monkeypatch.setattr(triton_rows, "rows_shard_grads", lambda *a, **k: calls.append(1) or original(*a, **k))
    loss = fc.concept_loss(h, w, y, c, bias=b, impl="triton", kernel_options=ROWS, margin=0.5)
    loss.backward(retain_graph=True)
    assert calls == []
    first = [t.grad.clone() for t in (h, w, b)]
    loss.backward()
    assert calls == [1]
    h64, w64, b64 = as_float64(h, w, b)
    ref = contract_loss(h64, w64, y, c, bias=b64, margin=0.5)[0]
    want = torch.autograd.grad(ref, (h64, w64, b64))
    for got1, t, g64 in zip(first, (h, w, b), want):
        assert rel_err(got1, g64) < 1e-4 and rel_err(t.grad, 2 * g64) < 1e-4


def test_no_rows():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    y, c = torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        loss, stats = fc.concept_loss(h, w, y, c, bias=b, impl="triton", kernel_options=ROWS, reduction=reduction,
                                      return_stats=True, z_loss=1e-3, label_smoothing=0.1)
        assert loss.shape == shape and torch.all(loss == 0) and all(t.shape == (0,) for t in stats)
        dh, dw, db = torch.autograd.grad(loss.sum(), (h, w, b))
        assert dh.shape == (0, 8) and torch.all(dw == 0) and torch.all(db == 0)


POISON = {  # where the bad value goes -> rows it must hit (None: every row)
    "hidden-nan": ("hidden", (1, 3), NAN, [1]),
    "hidden+inf": ("hidden", (2, 0), INF, [2]),
    "weight-nan": ("weight", (7, 1), NAN, None),
    "bias+inf": ("bias", (9,), INF, None),
}


def _small(seed):
    h, w, b, y, c, _ = make_inputs(n=6, v=40, d=8, k=3, seed=seed, ignored=(4,), empty_rows=(), dup=False)
    return h.detach().clone(), w.detach().clone(), b.detach().clone(), y, c


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("where", list(POISON))
def test_nonfinite_inputs_follow_the_policy_in_both_launch_modes(where, softcap):
    """docs/math.md "Non-finite values": NaN loss rows, statistics and gradients where a NaN / inf reaches,
    the other rows untouched, a softcap hiding nothing; reduction="none" (GIVEN backward) and "sum" (FUSED)."""
    tensor, index, value, hit = POISON[where]
    h, w, b, y, c = _small(seed=3)
    opts = dict(impl="triton", kernel_options=rows_options(chunk_rows=2 * 16), softcap=softcap, margin=0.5,
                z_loss=1e-3)
    clean = fc.concept_loss(h, w, y, c, bias=b, reduction="none", **opts)
    dict(hidden=h, weight=w, bias=b)[tensor][index] = value
    hit_rows = torch.zeros(6, dtype=torch.bool)
    hit_rows[hit if hit is not None else slice(None)] = True
    valid = y != -100
    for reduction in ("none", "sum"):
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        loss, stats = fc.concept_loss(hh, ww, y, c, bias=bb, reduction=reduction, return_stats=True, **opts)
        dh, dw, db = torch.autograd.grad(loss.sum(), (hh, ww, bb))
        assert torch.isnan(stats.lse[hit_rows]).all() and torch.isnan(stats.mass[hit_rows & valid]).all()
        assert torch.isnan(dh[hit_rows & valid]).all() and torch.isnan(dw).all() and torch.isnan(db).all()
        if hit is not None:
            assert torch.isfinite(dh[~hit_rows]).all()
        if reduction == "none":
            assert torch.isnan(loss[hit_rows & valid]).all()
            assert torch.equal(loss[~hit_rows | ~valid], clean[~hit_rows | ~valid])
        else:
            assert torch.isnan(loss)


def test_minus_inf_bias_masks_ids_in_both_launch_modes():
    h, w, b, y, c = _small(seed=5)
    unused = sorted(set(range(40)) - set(y.tolist()) - set(c.reshape(-1).tolist()))
    b[unused[:3]] = -INF
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    for reduction in ("sum", "none"):
        check_against_contract("triton", h, w, b, y, c, tol=1e-4, kernel_options=ROWS, softcap=3.0, margin=0.3,
                               reduction=reduction)


def test_fullgraph_compile():
    """Dynamo traces the loss as the registered ops without a graph break; the compiled call (aot_eager) gives
    the contract's loss and gradients."""
    h, w, b, y, c, _ = make_inputs(n=20, v=64, d=8, k=3, seed=41, ignored=(3,), empty_rows=(5,))
    fn = lambda h_, w_, b_: fc.concept_loss(h_, w_, y, c, bias=b_, impl="triton", margin=0.5,  # noqa: E731
                                            kernel_options=ROWS)
    explained = torch._dynamo.explain(fn)(h, w, b)
    assert explained.graph_break_count == 0, explained.break_reasons
    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(h, w, b)
    got = torch.autograd.grad(loss, (h, w, b), torch.tensor(0.8))
    h64, w64, b64 = as_float64(h, w, b)
    ref = contract_loss(h64, w64, y, c, bias=b64, margin=0.5)[0]
    want = torch.autograd.grad(ref, (h64, w64, b64), torch.tensor(0.8, dtype=torch.float64))
    assert rel_err(loss, ref) < 2e-5
    for g_got, g_want in zip(got, want):
        assert rel_err(g_got, g_want) < 1e-4


def test_weight_grad_over_64_chunks_within_the_torch_paths_error():
    """bf16, 1024 rows in 64 chunks of 16: the d_weight error against float64 of the default accumulation
    (float32 accumulator for a 16-bit weight) stays within 1.5x the torch path's on the same inputs;
    weight_accum="weight" (bf16 accumulation with beta = 1, Liger-Kernel's default) rounds the running sum
    64 times and is measurably worse. Measured here (2026-12-04, interpreter): 1024 x 256 x 32, K=11:
    torch 2.6e-3, rows default 3.0e-3 (1.14x), rows "weight" 9.4e-3 (3.6x); the bf16 rounding of the
    exact d_weight itself is 1.7e-3."""
    from benchmarks._impls import float64_loss_and_grads, make_inputs as bench_inputs

    h, w, y, c = bench_inputs(1024, 32, 128, 3, torch.bfloat16, seed=7)
    _, _, dw64 = float64_loss_and_grads(h, w, y, c)
    errors = {}
    for name, impl, options in (("torch", "torch", None), ("rows", "triton", rows_options()),
                                ("rows-weight", "triton", rows_options(weight_accum="weight"))):
        ww = w.clone().requires_grad_()
        (dw,) = torch.autograd.grad(fc.concept_loss(h, ww, y, c, impl=impl, kernel_options=options), (ww,))
        assert dw.dtype == torch.bfloat16
        errors[name] = rel_err(dw, dw64)
    assert errors["rows"] <= 1.5 * errors["torch"], errors
    assert errors["rows-weight"] > errors["rows"], errors


def test_chunk_rows_from_a_memory_budget():
    """Rows per chunk from chunk_mib (the logits of one chunk), multiples of 128, not from V / D: the
    Llama-3-8B head (V = 128256) gets 1024 rows in bf16 and 512 in float32, Gemma-2's V = 256000 512 rows
    (Liger's V / D rule gives it 128)."""
    rule = triton_rows.chunk_rows_for
    opts = triton_rows.rows_options()
    assert rule(16384, 128256, torch.bfloat16, opts, 1) == 1024
    assert rule(16384, 128256, torch.float32, opts, 1) == 512
    assert rule(8192, 256000, torch.bfloat16, opts, 1) == 512
    assert rule(8192, 256000, torch.bfloat16, triton_rows.rows_options(chunk_mib=1024), 1) == 2048
    assert rule(100, 128256, torch.bfloat16, opts, 1) == 100  # never more than N needs
    assert rule(4096, 10 ** 7, torch.bfloat16, opts, 4) == 12  # fewer than 128 fit: multiples of BLOCK_R
    assert rule(4096, 50, torch.float32, triton_rows.rows_options(chunk_rows=70), 16) == 64


def test_kernel_options_of_the_strategies_are_checked():
    h, w, b, y, c, _ = make_inputs(n=8, v=30, d=8, k=2, seed=1, ignored=(), empty_rows=())
    bad = [({"strategy": "fast"}, "strategy must be one of"),
           ({"weight_pass": "sweep"}, 'weight_pass was renamed.*strategy="recompute_sweep"'),
           ({"strategy": "rows", "filter_eps": 2 ** -12}, r"\['filter_eps'\] apply to the recompute strategies"),
           ({"strategy": "rows", "chunk_columns": 256}, r"\['chunk_columns'\] apply to the recompute"),
           ({"strategy": "rows", "deterministic": False}, "deterministic"),
           ({"chunk_rows": 64}, r"\['chunk_rows'\] apply to strategy=\"rows\" only"),
           ({"strategy": "rows", "weight_accum": "bf16"}, "weight_accum must be one of"),
           ({"strategy": "rows", "chunk_mib": 0}, "chunk_mib must be a positive"),
           ({"strategy": "rows", "chunk_rows": 0}, "chunk_rows must be None or a positive int")]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            fc.concept_loss(h, w, y, c, impl="triton", kernel_options=options)
    for strategy in ("recompute", "recompute_sweep", "rows"):
        check_against_contract("triton", h, w, b, y, c, kernel_options={"strategy": strategy}, reduction="sum")
