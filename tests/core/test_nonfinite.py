"""The non-finite policy and the degenerate shapes of docs/math.md, on every implementation.

Policy: a row whose hidden state holds a NaN or an infinity, and every row when the weight holds one or
the bias holds a NaN or +inf, gets a NaN loss, NaN statistics (lse, ce, mass) and NaN gradients, with
or without a softcap; other rows are untouched. -inf in the bias masks an id (probability 0).
"""
import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.contract import as_float64, contract_loss, rel_err
from helpers.impls import IMPLS, check_contract, loss_fn, one_rank_group
from helpers.checks import make_inputs

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module", autouse=True)
def group(tmp_path_factory):
    with one_rank_group(tmp_path_factory.mktemp("group")):
        yield


def small(seed=0, **kw):
    options = dict(n=6, v=40, d=8, k=3, seed=seed, ignored=(4,), empty_rows=(), dup=False)
    options.update(kw)
    h, w, b, y, c, _ = make_inputs(**options)
    return h.detach().clone(), w.detach().clone(), b.detach().clone(), y, c


def rows_and_grads(impl, h, w, b, y, c, **opts):
    """reduction="none" rows, stats and the gradients of their sum (None when nothing needs one)."""
    h, w, b = (t.detach().clone().requires_grad_() for t in (h, w, b))
    rows, stats = loss_fn(impl)(h, w, y, c, bias=b, reduction="none", return_stats=True, **opts)
    grads = torch.autograd.grad(rows.sum(), (h, w, b))
    return rows.detach(), stats, grads


POISON = {  # where the bad value goes -> rows it must hit (None: every valid row)
    "hidden-nan": ((1, 3), NAN, "hidden", [1]),
    "hidden+inf": ((2, 0), INF, "hidden", [2]),
    "hidden-inf": ((0, 5), -INF, "hidden", [0]),
    "weight-nan": ((7, 1), NAN, "weight", None),
    "weight+inf": ((11, 2), INF, "weight", None),
    "weight-inf": ((30, 4), -INF, "weight", None),
    "bias-nan": ((5,), NAN, "bias", None),
    "bias+inf": ((9,), INF, "bias", None),
}


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("where", list(POISON))
@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_input_gives_nan_rows_stats_and_grads(impl, where, softcap):
    index, value, tensor, hit = POISON[where]
    h, w, b, y, c = small(seed=3)
    clean, clean_stats, _ = rows_and_grads(impl, h, w, b, y, c, softcap=softcap, margin=0.5, z_loss=1e-3)
    dict(hidden=h, weight=w, bias=b)[tensor][index] = value
    valid = y != -100
    hit_rows = torch.zeros_like(valid)
    hit_rows[hit if hit is not None else slice(None)] = True
    rows, stats, (dh, dw, db) = rows_and_grads(impl, h, w, b, y, c, softcap=softcap, margin=0.5, z_loss=1e-3)
    assert torch.isnan(rows[hit_rows & valid]).all() and torch.isnan(stats.lse[hit_rows]).all()
    assert torch.isnan(stats.ce[hit_rows & valid]).all() and torch.isnan(stats.mass[hit_rows & valid]).all()
    # the rows it does not hit keep their values; ignored rows count nowhere
    assert torch.equal(rows[~hit_rows | ~valid], clean[~hit_rows | ~valid])
    assert torch.equal(stats.lse[~hit_rows], clean_stats.lse[~hit_rows])
    # the gradient: d hidden of the hit rows, and all of d weight and d bias, are NaN
    assert torch.isnan(dh[hit_rows & valid]).all() and torch.isnan(dw).all() and torch.isnan(db).all()
    if hit is not None:
        assert torch.isfinite(dh[~hit_rows]).all()
    for reduction in ("mean", "sum"):
        assert torch.isnan(loss_fn(impl)(h, w, y, c, bias=b, reduction=reduction, softcap=softcap))


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_row_with_nan_hidden_counts_nowhere_in_the_loss(impl):
    h, w, b, y, c = small(seed=4)
    clean = loss_fn(impl)(h, w, y, c, bias=b, reduction="none")
    h[4, 2] = NAN  # row 4 is ignored
    rows = loss_fn(impl)(h, w, y, c, bias=b, reduction="none")
    assert torch.equal(rows, clean) and rows[4] == 0
    mean = loss_fn(impl)(h, w, y, c, bias=b)
    assert torch.isfinite(mean) and float(mean) == pytest.approx(float(clean.sum() / 5), rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_bias_masks_an_id(impl):
    """-inf bias = probability 0: finite loss and gradient equal to the contract (which sees the -inf too);
    a masked target gives ce = +inf with the finite gradient softmax - onehot."""
    h, w, b, y, c = small(seed=5)
    unused = sorted(set(range(40)) - set(y.tolist()) - set(c.reshape(-1).tolist()))
    b[unused[:3]] = -INF
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    tol = 1e-4 if impl == "triton" else 2e-5
    for softcap in (None, 3.0):
        check_contract(impl, h, w, b, y, c, tol=tol, softcap=softcap, margin=0.3, reduction="sum")
    b2 = b.detach().clone()
    b2[y[0]] = -INF  # row 0's target
    b2.requires_grad_()
    rows, stats, grads = rows_and_grads(impl, h, w, b2, y, c, include_target=False, concept_weight=0.0)
    assert rows[0] == INF and stats.ce[0] == INF and torch.isfinite(rows[1:]).all()
    h64, w64, b64 = as_float64(h, w, b2)
    ref, _ = contract_loss(h64, w64, y, c, bias=b64, include_target=False, concept_weight=0.0, reduction="none")
    want = torch.autograd.grad(ref.sum(), (h64, w64, b64))
    for got_g, want_g in zip(grads, want):
        assert torch.isfinite(got_g).all() and rel_err(got_g, want_g) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_concept_set_fully_masked_gives_infinite_cl_and_finite_gradient(impl):
    """Every id of row 1's set masked: mass 0, cl = +inf; the gradient takes q = 0 (the set term
    pushes through lse only): d/dz [alpha ce + beta lse]."""
    h, w, b, y, c = small(seed=6)
    c[1] = torch.tensor([13, 14, -1])
    c[2:, :] = -1
    c[0, :] = -1
    b[[13, 14]] = -INF
    rows, stats, grads = rows_and_grads(impl, h, w, b, y, c, include_target=False, concept_weight=0.5)
    assert rows[1] == INF and stats.mass[1] == 0 and torch.isfinite(rows[[0, 2, 3, 5]]).all()
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    z = h64 @ w64.t() + b64
    lse = torch.logsumexp(z, 1)
    valid = y != -100
    ce = lse - z.gather(1, y.clamp(min=0)[:, None])[:, 0]
    want_rows = torch.where(valid, ce, torch.zeros_like(ce))
    want_rows = want_rows + torch.where(torch.arange(6) == 1, 0.5 * lse, torch.zeros_like(lse))
    want = torch.autograd.grad(want_rows.sum(), (h64, w64, b64))
    for got_g, want_g in zip(grads, want):
        assert torch.isfinite(got_g).all() and rel_err(got_g, want_g) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_every_id_masked(impl):
    """softmax over only -inf logits is undefined: NaN rows. Under a softcap every logit is -softcap."""
    h, w, b, y, c = small(seed=7)
    b[:] = -INF
    rows = loss_fn(impl)(h, w, y, c, bias=b, reduction="none")
    assert torch.isnan(rows[y != -100]).all()
    capped, stats = loss_fn(impl)(h, w, y, c, bias=b, reduction="none", softcap=4.0, return_stats=True)
    uniform = torch.log(torch.tensor(40.0))  # every logit -4: ce = log V
    assert torch.allclose(stats.ce[y != -100], uniform.expand(5), rtol=1e-6)


# ----------------------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["marginal", "soft"])
def test_no_rows(impl, mode):
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    c = torch.zeros(0, 3, dtype=torch.long)
    p = torch.rand(0, 3) if mode == "soft" else None
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        loss, stats = loss_fn(impl)(h, w, y, c, bias=b, concept_probs=p, mode=mode, reduction=reduction,
                                    return_stats=True, z_loss=1e-3)
        assert loss.shape == shape and torch.all(loss == 0)
        assert all(t.shape == (0,) for t in stats)
        dh, dw, db = torch.autograd.grad(loss.sum(), (h, w, b), allow_unused=True)
        assert dh.shape == (0, 8) and torch.all(dw == 0) and torch.all(db == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_id_vocabulary_and_one_dim_hidden(impl):
    """V = 1: lse = z_0, ce = 0 and mass = 1 on every valid row; D = 1; both against the contract."""
    h, w, b, y, c = small(seed=8, v=1, d=1, k=2)
    assert (y[y != -100] == 0).all()
    loss, stats = loss_fn(impl)(h, w, y, c, bias=b, reduction="none", return_stats=True)
    valid = y != -100
    assert torch.all(stats.ce[valid] == 0) and torch.all(loss[valid] == 0)
    assert torch.all(stats.mass[valid & (c != -1).any(1)] == 1)
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    check_contract(impl, h, w, b, y, c, tol=1e-4, z_loss=0.1, reduction="sum")
    h, w, b, y, c = small(seed=9, d=1)
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    check_contract(impl, h, w, b, y, c, tol=1e-4, margin=0.2)


@pytest.mark.parametrize("impl", IMPLS)
def test_concepts_wider_than_the_vocabulary(impl):
    """K = 90 > V = 40: every id listed, most of them twice -> mass 1 and cl = 0 on every valid row."""
    h, w, b, y, c = small(seed=10)
    g = torch.Generator().manual_seed(10)
    wide = torch.cat([torch.arange(40).repeat(6, 2), torch.randint(-1, 40, (6, 10), generator=g)], 1)
    loss, stats = loss_fn(impl)(h, w, y, wide, bias=b, reduction="none", return_stats=True)
    plain = loss_fn(impl)(h, w, y, bias=b, reduction="none")
    valid = y != -100
    assert torch.allclose(stats.mass[valid], torch.ones(5), atol=1e-6)
    assert torch.allclose(loss, plain, atol=1e-5)
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    check_contract(impl, h, w, b, y, wide, tol=1e-4, reduction="sum", include_target=False)


# -------------------------------------------------------------------------------- two vocabulary shards
def _two_rank_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    from fused_concept.parallel import vocab_parallel_concept_loss

    result = {}
    try:
        for where in ("weight-nan", "bias+inf", "hidden-nan", "weight+inf-softcap"):
            h, w, b, y, c = small(seed=11)
            if where.startswith("weight"):
                w[33, 2] = NAN if where == "weight-nan" else INF  # in rank 1's block [20, 40)
            elif where == "bias+inf":
                b[25] = INF
            else:
                h[2, 1] = NAN
            block = slice(0, 20) if rank == 0 else slice(20, 40)
            softcap = 3.0 if where.endswith("softcap") else None
            rows, stats = vocab_parallel_concept_loss(h, w[block], y, c, bias=b[block], reduction="none",
                                                      return_stats=True, softcap=softcap, impl="torch")
            result[where] = {"rows": [str(float(x)) for x in rows], "lse": [str(float(x)) for x in stats.lse]}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()


def test_two_shards_agree_on_the_poisoned_rows(tmp_path):
    """A NaN / inf in one rank's block of the head reaches every rank through the merge."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_two_rank_worker, args=(r, str(tmp_path / "store"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [p.exitcode for p in procs] == [0, 0]
    valid = [i for i in range(6) if i != 4]
    for where in ("weight-nan", "bias+inf", "weight+inf-softcap", "hidden-nan"):
        assert results[0][where] == results[1][where], where
        rows = [float(x) for x in results[0][where]["rows"]]
        hit = [2] if where == "hidden-nan" else valid
        assert all(rows[i] != rows[i] for i in hit), (where, rows)  # NaN
        assert all(rows[i] == rows[i] for i in range(6) if i not in hit), (where, rows)
