"""The Triton kernels, run for real (Triton's interpreter on CPU, or CUDA), against float64 oracles.

The oracles are written here from the formulas of concept-loss.md / docs/internals.md with explicit
float64 logits; they share no code with the package. Every case uses fresh random inputs.
"""
import os

import pytest
import torch

# tests/conftest.py sets TRITON_INTERPRET=1 before any import where there is no CUDA; with CUDA the
# kernels compile and run on the GPU

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from fused_concept.core.inputs import Canonical  # noqa: E402
from fused_concept.core.rowmath import Needs, RowGrad  # noqa: E402
from fused_concept.backends.triton_path import triton_partial_stats, triton_shard_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative tolerance (to the largest magnitude of the compared tensor) per input dtype
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# strategy "rows" takes its logits from the matrix product in the input dtype: a logit z errs by ~|z| 2^-9 in
# bf16 (2^-12 in fp16), the softmax by as much relatively (its 16-bit gradients measured up to 2.2e-2 of their
# largest entry in bf16 here, against ~3e-3 with the float32 logits of the recompute strategies)
ROWS_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


# ----------------------------------------------------------------------------------------------- inputs
def make_case(n, v_full, d, k, *, dtype, seed, soft=False, bias=False, shard=None):
    """Random canonical inputs of docs/internals.md step 0. shard = (vocab_start, V_shard) or None.

    Rows 0..2 are ignored (target -1, empty set), row 3 lists no concept id (empty set), row 4 repeats
    its target among the soft ids; soft ids keep duplicates, set ids are deduplicated, gold appended."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v_full, d, generator=g) * (3.0 / d ** 0.5)
    b = torch.randn(v_full, generator=g) if bias else None
    y = torch.randint(0, v_full, (n,), generator=g)
    concepts = torch.randint(0, v_full, (n, k), generator=g)
    if k:
        concepts[torch.rand(n, k, generator=g) < 0.3] = -1  # pads
        concepts[:, k // 2] = concepts[:, 0]  # duplicates
        if k > 1:
            concepts[5, 1] = y[5]  # synonym equal to the gold id
    ignored = torch.zeros(n, dtype=torch.bool)
    ignored[:3] = True
    empty = ignored.clone()
    empty[3] = True
    empty |= (concepts == -1).all(dim=1) if k else torch.ones(n, dtype=torch.bool)
    targets = torch.where(ignored, torch.full_like(y, -1), y)
    rows = []
    for i in range(n):
        members = [] if empty[i] else sorted(set(t for t in concepts[i].tolist() if t != -1) | {int(y[i])})
        rows.append(members)
    width = max([len(r) for r in rows] + [0])
    set_ids = torch.full((n, width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        set_ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    soft_ids = soft_w = None
    if soft:
        soft_ids = torch.where(empty[:, None], torch.full_like(concepts, -1), concepts)
        if k > 1:
            soft_ids[4, 1] = y[4]
        soft_w = torch.rand(n, k, generator=g) * (soft_ids != -1)
    vs, vsh = (0, v_full) if shard is None else shard
    case = dict(h=h.to(dtype), w_full=w.to(dtype), b_full=None if b is None else b.to(dtype), targets=targets,
                set_ids=set_ids, soft_ids=soft_ids, soft_w=soft_w, vs=vs, vsh=vsh)
    coef_g = torch.Generator().manual_seed(seed + 1)
    valid = ~ignored
    has_set = ~empty
    case["coef_dense"] = torch.rand(n, generator=coef_g) + 0.5
    case["coef_target"] = (torch.rand(n, generator=coef_g) + 0.5) * valid
    case["coef_set"] = (torch.rand(n, generator=coef_g) - 0.3) * has_set
    return case


def shard_args(c):
    w = c["w_full"][c["vs"]:c["vs"] + c["vsh"]]
    b = None if c["b_full"] is None else c["b_full"][c["vs"]:c["vs"] + c["vsh"]]
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return [dev(c["h"]), dev(w), dev(b), dev(c["targets"]), dev(c["set_ids"]), dev(c["soft_ids"]),
            dev(c["soft_w"])]


def canon_of(h, w, b, targets, set_ids, soft_ids, soft_w, *, vocab_start=0, softcap=None):
    """The step-0 bundle the backends take, built directly from canonical tensors (no validation, so the
    kernels' own checks are what the bad-input test sees)."""
    n = h.shape[0]
    ones = torch.ones(n, device=h.device)
    has_set = (set_ids >= 0).any(dim=1) if set_ids.shape[1] else torch.zeros_like(targets, dtype=torch.bool)
    return Canonical(hidden=h, weight=w, bias=b, targets=targets, valid=targets >= 0, set_ids=set_ids,
                     has_set=has_set, soft_ids=soft_ids, soft_weights=soft_w, ntp_weight=ones, concept_weight=ones,
                     lead_shape=torch.Size([n]), softcap=softcap, vocab_start=vocab_start)


def grads_of(h, w, b, targets, set_ids, soft_ids, soft_w, *, vocab_start=0, softcap=None, lse, set_lse, coef_dense,
             coef_target, coef_set, need_hidden=True, need_weight=True, need_bias=True, **kw):
    """triton_shard_grads on canonical tensors and per-row arrays."""
    canon = canon_of(h, w, b, targets, set_ids, soft_ids, soft_w, vocab_start=vocab_start, softcap=softcap)
    grad = RowGrad(lse=lse, set_lse=set_lse, coef_dense=coef_dense, coef_target=coef_target, coef_set=coef_set)
    return triton_shard_grads(canon, grad, Needs(need_hidden, need_weight, need_bias), **kw)


# ----------------------------------------------------------------------------------------------- oracle
def logits64(c, softcap, full=False):
    w = c["w_full"].double()
    z = c["h"].double() @ w.t()
    if c["b_full"] is not None:
        z = z + c["b_full"].double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z if full else z[:, c["vs"]:c["vs"] + c["vsh"]]


def oracle_stats(c, softcap):
    z = logits64(c, softcap)
    vs, vsh = c["vs"], c["vsh"]
    n = z.shape[0]
    target_logit = torch.zeros(n, dtype=torch.float64)
    set_lse = torch.full((n,), float("-inf"), dtype=torch.float64)
    soft_dot = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        y = int(c["targets"][i])
        if vs <= y < vs + vsh:
            target_logit[i] = z[i, y - vs]
        members = [t - vs for t in c["set_ids"][i].tolist() if vs <= t < vs + vsh]
        if members:
            set_lse[i] = torch.logsumexp(z[i, members], 0)
        if c["soft_ids"] is not None:
            for t, wk in zip(c["soft_ids"][i].tolist(), c["soft_w"][i].tolist()):
                if vs <= t < vs + vsh:
                    soft_dot[i] += wk * z[i, t - vs]
    return dict(max=z.max(1).values, lse=torch.logsumexp(z, 1), target_logit=target_logit, set_lse=set_lse,
                soft_dot=soft_dot, z=z)


def oracle_grads(c, softcap):
    """dz over the shard with GLOBAL lse / set_lse (from the full vocabulary), then dh, dW, db."""
    zf = logits64(c, softcap, full=True)
    vs, vsh = c["vs"], c["vsh"]
    lse = torch.logsumexp(zf, 1)
    n = zf.shape[0]
    set_lse = torch.full((n,), float("-inf"), dtype=torch.float64)
    for i in range(n):
        members = [t for t in c["set_ids"][i].tolist() if t != -1]
        if members:
            set_lse[i] = torch.logsumexp(zf[i, members], 0)
    dz = c["coef_dense"].double()[:, None] * torch.exp(zf - lse[:, None])
    for i in range(n):
        y = int(c["targets"][i])
        if y >= 0:
            dz[i, y] -= float(c["coef_target"][i])
        if c["soft_ids"] is None:
            for t in c["set_ids"][i].tolist():
                if t != -1:
                    dz[i, t] -= float(c["coef_set"][i]) * float(torch.exp(zf[i, t] - set_lse[i]))
        else:
            for t, wk in zip(c["soft_ids"][i].tolist(), c["soft_w"][i].tolist()):
                if t != -1:
                    dz[i, t] -= float(c["coef_set"][i]) * wk
    if softcap is not None:
        dz = dz * (1 - (zf / softcap) ** 2)
    dz = dz[:, vs:vs + vsh]
    w = c["w_full"].double()[vs:vs + vsh]
    return dict(lse=lse, set_lse=set_lse, dh=dz @ w, dw=dz.t() @ c["h"].double(), db=dz.sum(0))


def assert_close(got, want, dtype, what, tol=None):
    got = got.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    tol = TOL[dtype] if tol is None else tol
    scale = max(float(want.abs().max()), 1e-3)
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


def check_stats(c, softcap, dtype, **kw):
    stats = triton_partial_stats(canon_of(*shard_args(c), vocab_start=c["vs"], softcap=softcap), **kw)
    want = oracle_stats(c, softcap)
    for name in ("max", "lse", "target_logit", "soft_dot"):
        assert_close(getattr(stats, name), want[name], dtype, name)
    got_set = stats.set_lse.double().cpu()
    assert torch.equal(torch.isfinite(got_set), torch.isfinite(want["set_lse"])), "set_lse: empty rows differ"
    fin = torch.isfinite(want["set_lse"])
    assert_close(got_set[fin], want["set_lse"][fin], dtype, "set_lse")
    # argmax: a global id in the shard whose logit is the maximum (to the dtype's rounding)
    arg = stats.argmax.cpu()
    assert arg.dtype == torch.int64
    assert bool(((arg >= c["vs"]) & (arg < c["vs"] + c["vsh"])).all())
    at = want["z"].gather(1, (arg - c["vs"])[:, None])[:, 0]
    assert float((want["max"] - at).max()) <= TOL[dtype] * max(1.0, float(want["max"].abs().max()))
    return stats


def check_grads(c, softcap, dtype, *, need_hidden=True, need_weight=True, need_bias=True, **kw):
    want = oracle_grads(c, softcap)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    dh, dw, db = grads_of(
        *shard_args(c), vocab_start=c["vs"], softcap=softcap, lse=dev(want["lse"].float()),
        set_lse=dev(want["set_lse"].float()), coef_dense=dev(c["coef_dense"]), coef_target=dev(c["coef_target"]),
        coef_set=dev(c["coef_set"]), need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, **kw)
    assert (dh is None) == (not need_hidden)
    assert (dw is None) == (not need_weight)
    assert (db is None) == (not (need_bias and c["b_full"] is not None))
    tol = ROWS_TOL[dtype] if kw.get("strategy") == "rows" else TOL[dtype]
    if dh is not None:
        assert dh.shape == c["h"].shape
        assert_close(dh, want["dh"], dtype, "d_hidden", tol)
    if dw is not None:
        assert dw.shape == (c["vsh"], c["h"].shape[1])
        assert_close(dw, want["dw"], dtype, "d_weight", tol)
    if db is not None:
        assert_close(db, want["db"], dtype, "d_bias", tol)
    return dh, dw, db


# ------------------------------------------------------------------------------------------------ cases
# (name, (N, V_full, D), K, dtype, options)
CASES = [
    ("small-fp32-marginal", (37, 1001, 48), 4, torch.float32, {}),
    ("small-bf16-K16-bias-softcap", (37, 1001, 48), 16, torch.bfloat16,
     dict(bias=True, softcap=15.0, filter_eps=2.0 ** -12)),
    ("small-fp32-soft-K16-bias", (37, 1001, 48), 16, torch.float32, dict(soft=True, bias=True)),
    ("small-bf16-soft-softcap", (37, 1001, 48), 6, torch.bfloat16, dict(soft=True, softcap=20.0)),
    ("small-fp16-K3-bias", (37, 1001, 48), 3, torch.float16, dict(bias=True)),
    ("odd-D-fp32-soft", (29, 515, 37), 4, torch.float32, dict(bias=True, soft=True, softcap=5.0)),
    ("small-fp32-K0-frozen", (37, 1001, 48), 0, torch.float32, dict(need_weight=False, bias=True,
                                                                    need_bias=False)),
    ("big-bf16-K11-shard", (130, 4099, 80), 11, torch.bfloat16, dict(shard=(1500, 2077), bias=True, filter_eps=2.0 ** -12)),
    ("big-fp32-soft-shard-softcap", (130, 4099, 80), 5, torch.float32,
     dict(soft=True, shard=(0, 2050), softcap=30.0)),
    ("big-fp32-atomic-splits", (130, 4099, 80), 16, torch.float32,
     dict(bias=True, deterministic=False, vocab_splits=3)),
    ("big-bf16-soft-splits-sweep", (130, 4099, 80), 3, torch.bfloat16,
     dict(soft=True, vocab_splits=4, softcap=10.0, bias=True, strategy="recompute_sweep")),
    ("small-fp32-sweep", (37, 1001, 48), 5, torch.float32, dict(bias=True, strategy="recompute_sweep")),
    ("small-bf16-one-chunk", (37, 1001, 48), 5, torch.bfloat16, dict(bias=True, chunk_columns=4096)),
    ("small-bf16-frozen-weight-trainable-bias", (37, 1001, 48), 4, torch.bfloat16,
     dict(need_weight=False, bias=True, softcap=20.0, filter_eps=0.0)),
    ("small-bf16-K11-no-filter", (37, 1001, 48), 11, torch.bfloat16, dict(bias=True, filter_eps=0.0)),
    ("small-fp32-frozen-sweep", (37, 1001, 48), 4, torch.float32,
     dict(need_weight=False, bias=True, need_bias=False, strategy="recompute_sweep", vocab_splits=3)),
    # strategy "rows", its recomputing backward (GIVEN launches): vocabulary shards, several row chunks with
    # a ragged last one, soft ids, softcap, both dW accumulations, a frozen head
    ("rows-bf16-K11-shard", (130, 4099, 80), 11, torch.bfloat16,
     dict(shard=(1500, 2077), bias=True, softcap=20.0, strategy="rows", chunk_rows=48)),
    ("rows-fp32-soft-shard", (130, 4099, 80), 5, torch.float32,
     dict(soft=True, shard=(0, 2050), softcap=30.0, bias=True, strategy="rows", chunk_rows=64)),
    ("rows-fp16-K3-weight-accum", (37, 1001, 48), 3, torch.float16,
     dict(bias=True, strategy="rows", chunk_rows=16, weight_accum="weight")),
    ("rows-bf16-frozen-trainable-bias", (37, 1001, 48), 4, torch.bfloat16,
     dict(need_weight=False, bias=True, soft=True, strategy="rows")),
]


@pytest.mark.parametrize("name,shape,k,dtype,opts", CASES, ids=[c[0] for c in CASES])
def test_stats_and_grads_match_float64(name, shape, k, dtype, opts):
    opts = dict(opts)
    softcap = opts.pop("softcap", None)
    make = {key: opts.pop(key) for key in ("soft", "bias", "shard") if key in opts}
    stats_kw = {key: opts[key] for key in ("vocab_splits",) if key in opts}
    n, v, d = shape
    c = make_case(n, v, d, k, dtype=dtype, seed=hash(name) % 10_000, **make)
    check_stats(c, softcap, dtype, **stats_kw)
    check_grads(c, softcap, dtype, **opts)


# ------------------------------------------------------------------------------ through the public API
import fused_concept as fc  # noqa: E402
from helpers.contract import rel_err  # noqa: E402
from helpers.checks import check_against_contract, make_inputs  # noqa: E402

# check_against_contract (tests/helpers/checks.py) works on CPU tensors: the interpreter runs them
cpu_only = pytest.mark.skipif(DEVICE == "cuda", reason="contract helpers take CPU tensors; see the *_on_device tests")

E2E_CASES = [
    dict(mode="marginal", reduction="mean"),
    dict(mode="marginal", margin=0.6, reduction="none", include_target=False),
    dict(mode="soft", reduction="sum", z_loss=1e-3),
    dict(mode="soft", margin=0.6, reduction="mean", softcap=12.0),
    dict(mode="marginal", reduction="sum", softcap=8.0, z_loss=1e-4, ntp_weight=0.3, concept_weight=2.0),
]


@cpu_only
@pytest.mark.parametrize("opts", E2E_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_concept_loss_triton_matches_contract(opts):
    h, w, b, y, c, p = make_inputs(seed=len(str(opts)), probs=opts.get("mode") == "soft")
    if opts.get("mode") != "soft":
        p = None
    check_against_contract("triton", h, w, b, y, c, p, **opts)


@cpu_only
def test_concept_loss_triton_bfloat16_and_frozen_head():
    h, w, b, y, c, _ = make_inputs(seed=3, dtype=torch.bfloat16)
    check_against_contract("triton", h, w, b, y, c, tol=1e-2, grad_tol=2e-2, margin=0.05, reduction="sum")
    w.requires_grad_(False)
    b.requires_grad_(False)
    check_against_contract("triton", h, w, b, y, c, tol=1e-2, grad_tol=2e-2, reduction="mean")


def test_concept_objective_triton_matches_torch_path_on_device():
    h, w, b, y, c, _ = make_inputs(seed=11, bias=False)
    h, w = (t.detach().to(DEVICE).requires_grad_() for t in (h, w))
    y, c = y.to(DEVICE), c.to(DEVICE)
    got = fc.concept_objective(h, w, y, c, lam=0.4, margin=0.3, impl="triton")
    want = fc.concept_objective(h, w, y, c, lam=0.4, margin=0.3, impl="torch")
    assert rel_err(got, want) < 2e-5
    g_got = torch.autograd.grad(got, (h, w))
    g_want = torch.autograd.grad(want, (h, w))
    for a, e in zip(g_got, g_want):
        assert rel_err(a, e) < 1e-4


def test_nan_in_hidden_gives_nan_loss_on_device():
    h, w, b, y, c, _ = make_inputs(seed=5)
    h, w, b, y, c = (t.detach().to(DEVICE) for t in (h, w, b, y, c))
    h[4, 7] = float("nan")
    assert torch.isnan(fc.concept_loss(h, w, y, c, bias=b, impl="triton"))
    h[4, 7] = float("inf")
    assert torch.isnan(fc.concept_loss(h, w, y, c, bias=b, impl="triton"))


# --------------------------------------------------------------------- determinism, layout, ties, errors
def test_same_inputs_give_bitwise_same_outputs():
    c = make_case(37, 1001, 48, 6, dtype=torch.float32, seed=21, bias=True)
    first = check_grads(c, None, torch.float32)
    again = check_grads(c, None, torch.float32)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    s1 = triton_partial_stats(canon_of(*shard_args(c)))
    s2 = triton_partial_stats(canon_of(*shard_args(c)))
    assert s1.logit_sum is None and s2.logit_sum is None
    assert all(torch.equal(a, b) for a, b in zip(s1, s2) if a is not None)


def test_strided_inputs_give_the_contiguous_result():
    c = make_case(37, 1001, 48, 5, dtype=torch.float32, seed=8, bias=True)
    args = shard_args(c)
    h_t = args[0].t().contiguous().t()  # column-major hidden
    w_wide = torch.zeros(args[1].shape[0], 2 * args[1].shape[1], dtype=args[1].dtype, device=DEVICE)
    w_wide[:, ::2] = args[1]
    w_strided = w_wide[:, ::2]  # stride (2D, 2)
    b_wide = torch.zeros(2 * args[2].shape[0], device=DEVICE)
    b_wide[::2] = args[2]
    strided = [h_t, w_strided, b_wide[::2]] + args[3:]
    assert not h_t.is_contiguous() and not w_strided.is_contiguous()
    a = triton_partial_stats(canon_of(*args))
    s = triton_partial_stats(canon_of(*strided))
    for x, y in zip(a, s):
        assert (x is None) == (y is None)
        assert x is None or torch.allclose(x, y, atol=1e-5, rtol=1e-5)
    kw = dict(vocab_start=0, softcap=None, lse=a.lse, set_lse=a.set_lse, coef_dense=c["coef_dense"].to(DEVICE),
              coef_target=c["coef_target"].to(DEVICE), coef_set=c["coef_set"].to(DEVICE))
    for x, y in zip(grads_of(*args, **kw), grads_of(*strided, **kw)):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)


def test_argmax_ties_take_the_lowest_id_across_vocab_slices():
    # small integers: every logit is exact, so ties are exact; slice boundaries at 512-multiples
    g = torch.Generator().manual_seed(2)
    n, v, d = 20, 1600, 32
    h = torch.randint(-2, 3, (n, d), generator=g).float()
    w = torch.randint(-2, 3, (v, d), generator=g).float()
    w[1500] = w[700] = w[300] = 10.0  # the same maximal row three times, in three different slices
    for splits in (1, 3):
        canon = canon_of(h.to(DEVICE), w.to(DEVICE), None, torch.zeros(n, dtype=torch.long, device=DEVICE),
                         torch.full((n, 0), -1, dtype=torch.long, device=DEVICE), None, None, vocab_start=100)
        st = triton_partial_stats(canon, vocab_splits=splits)
        z = h.double() @ w.double().t()
        want = z.argmax(1) + 100  # torch returns the first maximal index
        assert torch.equal(st.argmax.cpu(), want), splits
        assert torch.allclose(st.lse.cpu().double(), torch.logsumexp(z, 1), atol=1e-5, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
    c = make_case(8, 64, 16, 2, dtype=torch.float32, seed=1)
    args = shard_args(c)
    with pytest.raises(TypeError, match="same dtype"):
        triton_partial_stats(canon_of(args[0], args[1].double(), *args[2:]))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        triton_partial_stats(canon_of(args[0].double(), args[1].double(), *args[2:]))
    with pytest.raises(ValueError, match="share D"):
        triton_partial_stats(canon_of(args[0][:, :8], *args[1:]))
    with pytest.raises(ValueError, match="softcap"):
        triton_partial_stats(canon_of(*args, softcap=-1.0))


def test_tile_filter_is_a_switch_with_a_bounded_effect():
    """filter_eps drops whole dense tiles whose softmax probabilities are all below it: tiny eps changes
    nothing measurable here, a huge eps drops the dense term entirely (so the switch is live)."""
    c = make_case(37, 1001, 48, 3, dtype=torch.float32, seed=4)
    exact = check_grads(c, None, torch.float32)
    tiny = check_grads(c, None, torch.float32, filter_eps=1e-30)
    assert exact[2] is None and tiny[2] is None  # no bias
    for a, b in zip(exact[:2], tiny[:2]):
        assert torch.equal(a, b)
    want = oracle_grads(c, None)
    with pytest.raises(AssertionError, match="d_hidden"):
        check_grads(c, None, torch.float32, filter_eps=2.0)
    assert want["dh"].abs().max() > 0


def test_chunked_weight_grad_comes_back_in_bf16_and_exact_at_confident_targets():
    """The chunked backward stores d_weight / d_bias in the input dtype (d_hidden stays float32). The
    heads here are confident (p_target ~ 0.96), so at the target rows dW_v = sum_i (p_iv - 1) h_i is much
    smaller than its dense part sum_i p_iv h_i: the sparse terms must be added before the one rounding to
    bf16 (a rounded dense part plus the exact correction would be off by ~2^-9 of the dense part)."""
    dtype = torch.bfloat16
    c = make_case(40, 300, 48, 3, dtype=dtype, seed=11, bias=True, shard=(20, 260))
    g = torch.Generator().manual_seed(12)
    w = torch.randn(300, 48, generator=g) * (0.3 / 48 ** 0.5)
    u = torch.nn.functional.normalize(torch.randn(300, 48, generator=g), dim=1)
    y = c["targets"]
    tgt = y[y >= 0].unique()
    w[tgt] = 3.0 * u[tgt]
    h = torch.randn(40, 48, generator=g)
    h[y >= 0] = 3.0 * u[y[y >= 0]] + 0.1 * h[y >= 0]
    c["h"], c["w_full"], c["b_full"] = h.to(dtype), w.to(dtype), (0.1 * c["b_full"].float()).to(dtype)
    # the CE gradient (p - 1 at y); the concept terms are covered by the cases above
    c["coef_dense"], c["coef_target"], c["coef_set"] = torch.ones(40), (y >= 0).float(), torch.zeros(40)
    dh, dw, db = check_grads(c, None, dtype)
    assert dh.dtype == torch.float32 and dw.dtype == dtype and db.dtype == dtype
    want = oracle_grads(c, None)
    p = torch.softmax(logits64(c, None, full=True), 1)[:, c["vs"]:c["vs"] + c["vsh"]]
    dense = p.t() @ c["h"].double()
    rows = [int(t) - c["vs"] for t in tgt if c["vs"] <= int(t) < c["vs"] + c["vsh"]]
    assert len(rows) >= 10
    cancel = 0
    for r in rows:
        row_scale = float(want["dw"][r].abs().max())
        cancel += float(dense[r].abs().max()) > 10 * row_scale  # the dense part dwarfs the result
        err = float((dw[r].double().cpu() - want["dw"][r]).abs().max())
        assert err <= 1e-2 * row_scale + 1e-6, (r, err, row_scale)
    assert cancel >= len(rows) // 2


# ------------------------------------------------------------------------------------ tile filter, skipping
def filtered_oracle(c, softcap, eps, tile_rows, tile_cols):
    """oracle_grads with the filter applied as the chunked backward defines it, on tile_rows x tile_cols
    tiles of the shard's [N, V_shard] logit gradient: the dense part of a tile whose every softmax
    probability is below eps is dropped (its sparse terms stay), and a tile is multiplied out when it
    keeps a dense part or holds a nonzero sparse term. Returns (grads, [tiles] dropped dense parts,
    number of tiles multiplied out, smallest relative distance of a tile maximum to eps)."""
    zf = logits64(c, softcap, full=True)
    vs, vsh = c["vs"], c["vsh"]
    n = zf.shape[0]
    p = torch.softmax(zf, 1)[:, vs:vs + vsh]
    rt, ct = -(-n // tile_rows), -(-vsh // tile_cols)

    def per_tile(x):
        pad = torch.zeros(rt * tile_rows, ct * tile_cols, dtype=torch.float64)
        pad[:n, :vsh] = x
        return pad.reshape(rt, tile_rows, ct, tile_cols).amax((1, 3))

    tile_max = per_tile(p)
    dropped = tile_max < eps
    sparse = torch.zeros(n, vsh, dtype=torch.float64)  # where a nonzero sparse term lands
    for i in range(n):
        ids = [int(c["targets"][i])] if float(c["coef_target"][i]) != 0 else []
        ids += [t for t in c["set_ids"][i].tolist() if t != -1] if float(c["coef_set"][i]) != 0 else []
        for t in ids:
            if vs <= t < vs + vsh:
                sparse[i, t - vs] = 1.0
    multiplied = int(((~dropped) | (per_tile(sparse) > 0)).sum())
    drop = dropped.repeat_interleave(tile_rows, 0).repeat_interleave(tile_cols, 1)[:n, :vsh]
    full = oracle_grads(c, softcap)
    dense = c["coef_dense"].double()[:, None] * p * drop  # the dense part the filter removes
    if softcap is not None:
        dense = dense * (1 - (zf[:, vs:vs + vsh] / softcap) ** 2)
    w = c["w_full"].double()[vs:vs + vsh]
    want = dict(full, dh=full["dh"] - dense @ w, dw=full["dw"] - dense.t() @ c["h"].double(),
                db=full["db"] - dense.sum(0), tile_max=tile_max)
    margin = float(((tile_max - eps).abs() / eps).min())
    return want, dropped, multiplied, margin


def test_chunked_backward_skips_filtered_tiles_exactly():
    """With a Zipf-biased head most tiles hold only tiny probabilities: the chunked pass drops their dense
    part and skips them in both products (count_tiles), and the result equals the float64 gradient with
    exactly those dense parts removed. Tiles holding a sparse term are multiplied out even when their
    probabilities are tiny (row 6's target and row 7's concept ids are such ids); vocabulary rows whose
    every tile is dropped get exactly zero."""
    from fused_concept.backends.triton_path import count_tiles
    from fused_concept.kernels import configs

    dtype = torch.float32
    n, v_full, vs, vsh = 150, 2300, 100, 2150
    c = make_case(n, v_full, 40, 0, dtype=dtype, seed=31, bias=True, shard=(vs, vsh))
    g = torch.Generator().manual_seed(32)
    c["b_full"] = (-3.0 * torch.log(torch.arange(1, v_full + 1).double())).float()  # few ids carry the mass
    c["targets"] = torch.where(c["targets"] >= 0, torch.randint(0, 200, (n,), generator=g), c["targets"])
    c["targets"][6] = 2200  # a negligible id
    c["set_ids"] = torch.full((n, 3), -1, dtype=torch.int64)
    c["set_ids"][7] = torch.tensor([2150, 2190, int(c["targets"][7])])
    c["coef_set"] = torch.zeros(n)
    c["coef_set"][7] = 0.8
    cfg = configs.choose("dense_grad_chunk", dtype, torch.device(DEVICE))
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    # eps in the widest gap between consecutive tile maxima (the tile geometry is the device's) that
    # drops at least one whole column of tiles: no tile maximum is near eps, so the float32 kernel and
    # this oracle decide alike
    tile_max = filtered_oracle(c, None, 1.0, bm, bn)[0]["tile_max"]
    maxima = tile_max.flatten().sort().values
    cuts = [(float(hi / lo), float((lo * hi).sqrt())) for lo, hi in zip(maxima[:-1], maxima[1:])
             if bool((tile_max.amax(0) < (lo * hi).sqrt()).any())]
    eps = max(cuts)[1]
    want, dropped, multiplied, margin = filtered_oracle(c, None, eps, bm, bn)
    assert margin > 0.1 and int(dropped.sum()) >= 3
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    with count_tiles() as counted:
        dh, dw, db = grads_of(*shard_args(c), vocab_start=vs, softcap=None, lse=dev(want["lse"].float()),
                              set_lse=dev(want["set_lse"].float()), coef_dense=dev(c["coef_dense"]),
                              coef_target=dev(c["coef_target"]), coef_set=dev(c["coef_set"]), filter_eps=eps,
                              chunk_columns=3 * bn)  # several chunks, the last one partial
    assert counted.total == dropped.numel() and counted.kept == multiplied
    assert multiplied < counted.total - 3  # tiles were skipped
    for got, key in ((dh, "dh"), (dw, "dw"), (db, "db")):
        assert_close(got, want[key], dtype, key)
    # vocabulary rows whose every tile is dropped and which hold no sparse term: exactly zero, where the
    # unfiltered gradient is not
    gone = dropped.all(dim=0).repeat_interleave(bn)[:vsh]
    gone[c["targets"][c["targets"] >= vs] - vs] = False
    gone[torch.tensor([2150, 2190]) - vs] = False
    assert int(gone.sum()) > 50
    assert torch.equal(dw[gone].cpu(), torch.zeros_like(dw[gone].cpu())) and not bool((db[gone] != 0).any())
    assert float(oracle_grads(c, None)["dw"][gone].abs().min()) > 0


def test_filter_eps_auto_and_its_checks():
    from fused_concept.backends.triton_path import AUTO_FILTER_EPS, filter_threshold

    assert AUTO_FILTER_EPS == 0.0  # off: measured slower on the H200 (see _triton_path.AUTO_FILTER_EPS)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert filter_threshold("auto", dtype) == 0.0
    assert filter_threshold(1e-5, torch.float32) == 1e-5 and filter_threshold(0, torch.bfloat16) == 0.0
    for bad in (-1e-3, "high", True, None):
        with pytest.raises(ValueError, match="filter_eps"):
            filter_threshold(bad, torch.bfloat16)


def test_tile_counts_by_strategy():
    """count_tiles: every tile kept without a filter (chunked, trainable or frozen head), None for the
    strategies that do not count (the sweeps)."""
    from fused_concept.backends.triton_path import count_tiles

    c = make_case(37, 1001, 48, 3, dtype=torch.float32, seed=9, bias=True)
    with count_tiles() as chunked:
        check_grads(c, None, torch.float32)
    assert chunked.total > 0 and chunked.kept == chunked.total
    with count_tiles() as frozen:
        check_grads(c, None, torch.float32, need_weight=False, need_bias=False)
    assert frozen.total == chunked.total and frozen.kept == frozen.total
    with count_tiles() as sweep:
        check_grads(c, None, torch.float32, need_weight=False, need_bias=False, strategy="recompute_sweep")
    assert sweep.kept is None


def test_skip_lists_fit_the_matmul_blocks_in_every_configuration():
    """chunk_matmul walks the chunk tiles' kept lists in BLOCK_M x BLOCK_K steps: both must divide both
    sides of the dense_grad_chunk tile (dR_c and dR_c^T), for every architecture and the interpreter."""
    from fused_concept.kernels import configs

    for cls in ("16bit", "fp32"):
        pairs = [(configs.config_for("dense_grad_chunk", cls, a), configs.config_for("chunk_matmul", cls, a))
                 for a in configs.ARCHS]
        pairs.append((configs._INTERPRETER["dense_grad_chunk"], configs._INTERPRETER["chunk_matmul"]))
        for tile, mm in pairs:
            for side in (tile.blocks["BLOCK_M"], tile.blocks["BLOCK_N"]):
                assert side % mm.blocks["BLOCK_M"] == 0 and side % mm.blocks["BLOCK_K"] == 0, (cls, tile, mm)


def test_chunk_products_read_only_the_listed_tiles():
    """tile_lists + chunk_matmul alone: dropped tiles of A hold NaN, so any read of one shows; both
    products (A @ B accumulated into C, and A^T @ H) equal float64 products of A with those tiles zeroed,
    including a band of rows with no kept tile and a partial last tile in both directions."""
    from fused_concept.backends.triton_path import _matmul, _skip_lists
    from fused_concept.kernels import configs

    cfg = configs.choose("dense_grad_chunk", torch.float32, torch.device(DEVICE))
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    g = torch.Generator().manual_seed(5)
    rows, cols, d = 3 * bm - 10, 2 * bn + 40, 24
    r_tiles, c_tiles = -(-rows // bm), -(-cols // bn)
    keep = (torch.rand(r_tiles, c_tiles, generator=g) < 0.6).to(torch.int8)
    keep[1] = 0  # a band with nothing to multiply
    keep[0, 0] = keep[2, c_tiles - 1] = 1
    mask = keep.bool().repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
    a = torch.randn(rows, cols, generator=g)
    b = torch.randn(cols, d, generator=g)
    h = torch.randn(rows, d, generator=g)
    c0 = torch.randn(rows, d, generator=g)
    want_c = c0.double() + torch.where(mask, a, 0.0).double() @ b.double()
    want_w = torch.where(mask, a, 0.0).double().t() @ h.double()
    a[~mask] = float("nan")
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    by_row, by_col = _skip_lists(dev(keep), bm, bn)
    assert by_row.count.tolist() == keep.sum(1).tolist() and by_col.count.tolist() == keep.sum(0).tolist()
    c, w = dev(c0.clone()), torch.full((cols, d), float("nan"), device=DEVICE)
    _matmul(dev(a), dev(b), c, accumulate=True, skip=by_row)
    _matmul(dev(a).t(), dev(h), w, accumulate=False, skip=by_col)
    assert_close(c, want_c, torch.float32, "A @ B over kept tiles")
    assert_close(w, want_w, torch.float32, "A^T @ H over kept tiles")
