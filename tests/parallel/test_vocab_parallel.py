"""fused_concept.parallel on CPU / gloo: spawned ranks against the float64 contract (tests/helpers/contract.py).

One spawn of 3 processes runs every case on several layouts (the cost of starting torch in each
process is paid once): the default 3-rank group with V = 1001 split [300, 401, 300], a 2-rank
sub-group {0, 1} with V = 37 split [20, 17], a 2-rank sub-group {1, 2} (group ranks differ from
global ranks) and a 3-rank layout whose middle rank holds no rows. Every rank checks its own loss,
statistics, replicated d_hidden and its slice of d_weight / d_bias; the parent turns the per-rank
verdicts into one pytest case per (layout, case). Inputs are fresh random draws (the seed is printed
on failure; FC_DIST_SEED=... replays one; FC_DIST_CASES=regex runs a subset).
"""
import datetime
import itertools
import json
import os
import random
import re
import traceback
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.contract import as_float64, contract_loss, rel_err

WORLD = 3
# name -> (global ranks forming the group, rows of the head held by each, in group-rank order)
LAYOUTS = {
    "w3": ((0, 1, 2), (300, 401, 300)),
    "w2": ((0, 1), (20, 17)),
    "w2_ranks12": ((1, 2), (9, 14)),
    "w3_empty_rank": ((0, 1, 2), (15, 0, 8)),
}
FULL_LAYOUTS = ("w3", "w2")  # where the whole option sweep runs
TIMEOUT_S = 240
ONLY = os.environ.get("FC_DIST_CASES", "")  # a regex over "layout/case" to run a subset while developing

# every (mode, margin, include_target, reduction); bias, per-row weights, softcap, z_loss, label smoothing rotate
OPTION_CASES = list(itertools.product(["marginal", "soft"], [None, "cut"], [True, False], ["mean", "sum", "none"]))


class Env(NamedTuple):
    layout: str
    group: object
    sizes: tuple
    rank: int  # rank in the group
    start: int  # first global id of this rank's block
    vocab: int
    seed: int
    groups: dict  # every layout's group (None: the default group; a non-member gets a placeholder)

    @property
    def block(self):
        return slice(self.start, self.start + self.sizes[self.rank])


# ------------------------------------------------------------------------------------------------
# inputs and checks (run inside the ranks)
# ------------------------------------------------------------------------------------------------

def boundary_ids(sizes):
    """First and last global id of every non-empty block: where off-by-one bugs live."""
    ids, start = [], 0
    for s in sizes:
        if s:
            ids += [start, start + s - 1]
        start += s
    return ids


def make_inputs(env, case_seed, *, n=24, d=16, k=5, lead=None, dtype=torch.float32, bias=True, probs=False):
    """Replicated inputs (the same on every rank: same seed) with ids in every block, duplicates,
    a synonym equal to the gold id, ignored rows and rows that list no id."""
    g = torch.Generator().manual_seed(env.seed * 1000 + case_seed)
    v = env.vocab
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.5
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    # a few rows pointed at their gold id so that sets hold real mass (the margin then cuts some rows)
    y = torch.randint(0, v, (n,), generator=g)
    c = torch.randint(0, v, (n, k), generator=g)
    c[torch.rand(n, k, generator=g) < 0.3] = -1
    edges = boundary_ids(env.sizes)
    for j, t in enumerate(edges):
        y[j % n] = t
        c[(j + 3) % n, j % k] = t
    for i in range(0, n, 4):
        h[i] += 1.5 * w[y[i]]
    y[n - 3] = -100  # ignored rows
    y[n - 7] = -100
    c[n - 5] = -1  # a valid row whose concepts list no id
    c[1, 1] = c[1, 0] if c[1, 0] != -1 else 0  # duplicate
    c[2, 2] = y[2]  # synonym equal to the gold id
    p = torch.rand(n, k, generator=g) if probs else None
    if lead is not None:
        h, y, c = h.reshape(*lead, d), y.reshape(lead), c.reshape(*lead, k)
        p = None if p is None else p.reshape(*lead, k)
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), y, c, p


def all_equal_across_group(env, t):
    t = t.detach().contiguous()
    every = [torch.empty_like(t) for _ in env.sizes]
    dist.all_gather(every, t, group=env.group)
    return all(torch.equal(e, every[0]) for e in every)


def check(env, h, w, b, y, c, p=None, *, tol=2e-5, grad_tol=1e-4, upstream_seed=0, impl="auto",
          argmax_exact=True, **opts):
    """Sharded loss / stats / gradients against the float64 contract on the whole head."""
    from fused_concept import concept_loss
    from fused_concept.parallel import vocab_parallel_concept_loss

    h_r = h.detach().clone().requires_grad_()
    w_r = w.detach()[env.block].clone().requires_grad_()
    b_r = None if b is None else b.detach()[env.block].clone().requires_grad_()
    loss, stats = vocab_parallel_concept_loss(h_r, w_r, y, c, group=env.group, bias=b_r, concept_probs=p,
                                              impl=impl, return_stats=True, **opts)
    h64, w64, b64 = as_float64(h.requires_grad_(), w.requires_grad_(), None if b is None else b.requires_grad_())
    ref, ref_stats = contract_loss(h64, w64, y, c, bias=b64, concept_probs=None if p is None else p.double(),
                                   **opts)
    assert loss.shape == ref.shape, (loss.shape, ref.shape)
    assert torch.isfinite(loss).all()
    assert rel_err(loss, ref) < tol, (float(loss.sum()), float(ref.sum()))
    for name in ("lse", "ce", "mass", "argmax"):
        assert getattr(stats, name).shape == y.shape, name
    assert rel_err(stats.lse, ref_stats["lse"]) < tol
    assert rel_err(stats.ce, ref_stats["ce"]) < tol
    assert (stats.mass.double() - ref_stats["mass"]).abs().max() < tol * 10
    if argmax_exact:
        assert torch.equal(stats.argmax, ref_stats["argmax"]), (stats.argmax, ref_stats["argmax"])
    else:  # low precision: the chosen id's float64 logit must be a maximum up to the dtype's rounding
        z64 = h64.detach().reshape(-1, h.shape[-1]) @ w64.detach().t() + (0 if b64 is None else b64.detach())
        picked = z64.gather(1, stats.argmax.reshape(-1, 1)).squeeze(1)
        assert (z64.max(1).values - picked).max() < tol * z64.abs().max(), "argmax is not a maximum"

    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64) if loss.dim() else \
        torch.tensor(1.7, dtype=torch.float64)
    ours = [t for t in (h_r, w_r, b_r) if t is not None]
    theirs = [t for t in (h64, w64, b64) if t is not None]
    got = torch.autograd.grad(loss, ours, upstream.to(loss.dtype))
    want = torch.autograd.grad(ref, theirs, upstream)
    for name, g_got, g_want, mine in zip(("hidden", "weight", "bias"), got, want, ours):
        assert g_got.dtype == mine.dtype and g_got.shape == mine.shape, name
        if name != "hidden":
            g_want = g_want[env.block]
        if g_want.numel():
            assert rel_err(g_got, g_want) < grad_tol, (name, rel_err(g_got, g_want))
    # replicated results are bitwise the same on every rank
    assert all_equal_across_group(env, loss), "loss differs across ranks"
    assert all_equal_across_group(env, stats.argmax), "argmax differs across ranks"
    assert all_equal_across_group(env, got[0]), "d_hidden differs across ranks"

    # and the single-device loss on the whole head agrees
    single, single_stats = concept_loss(h.detach(), w.detach(), y, c, bias=None if b is None else b.detach(),
                                        concept_probs=p, impl="torch", return_stats=True, **opts)
    assert rel_err(loss, single) < tol
    if argmax_exact:
        assert torch.equal(stats.argmax, single_stats.argmax)
    return loss, stats


# ------------------------------------------------------------------------------------------------
# the cases; each runs on every rank of the layout's group
# ------------------------------------------------------------------------------------------------

CASES = {}


def case(*layouts):
    def register(fn):
        CASES[fn.__name__] = (fn, layouts or tuple(LAYOUTS))
        return fn
    return register


def _cut_margin(env, h, w, b, y, c, p, opts):
    """A margin halfway between two float64 set masses, so the hinge keeps some rows and cuts others."""
    h64, w64, b64 = as_float64(h, w, b)
    _, st = contract_loss(h64, w64, y, c, bias=b64, concept_probs=None if p is None else p.double(),
                          **{**opts, "margin": None})
    masses = sorted(set(m for m in st["mass"].reshape(-1).tolist() if m > 0))
    assert len(masses) >= 4, masses
    j = len(masses) // 2
    return 0.5 * (masses[j - 1] + masses[j])


def _make_option_case(index):
    mode, margin, include_target, reduction = OPTION_CASES[index]

    def run(env):
        h, w, b, y, c, p = make_inputs(env, index, bias=index % 3 != 0, probs=mode == "soft")
        n = y.numel()
        g = torch.Generator().manual_seed(env.seed + index)
        per_row = index % 2 == 0
        opts = dict(mode=mode, include_target=include_target, reduction=reduction,
                    ntp_weight=torch.rand(n, generator=g) + 0.5 if per_row else 0.7,
                    concept_weight=torch.rand(n, generator=g) + 0.5 if per_row else 1.3,
                    softcap=[None, 5.0, 30.0][index % 3], z_loss=[0.0, 1e-3][(index // 3) % 2],
                    label_smoothing=[0.0, 0.15][(index // 2) % 2])
        if margin == "cut":
            opts["margin"] = _cut_margin(env, h, w, b, y, c, p, opts)
        check(env, h, w, b, y, c, p, upstream_seed=index, **opts)

    run.__name__ = "options_" + "-".join(str(x) for x in OPTION_CASES[index])
    return run


for _i in range(len(OPTION_CASES)):
    _fn = _make_option_case(_i)
    CASES[_fn.__name__] = (_fn, FULL_LAYOUTS)


@case()
def default_options(env):
    h, w, b, y, c, _ = make_inputs(env, 101)
    check(env, h, w, b, y, c)


@case("w3", "w2")
def leading_dims_and_stats_shapes(env):
    h, w, b, y, c, _ = make_inputs(env, 102, lead=(4, 6))
    check(env, h, w, b, y, c, reduction="none")
    check(env, h, w, b, y, c, reduction="mean", margin=0.3)


@case("w3", "w3_empty_rank")
def half_precision(env):
    for dtype in (torch.bfloat16, torch.float16):
        h, w, b, y, c, _ = make_inputs(env, 103, dtype=dtype)
        check(env, h, w, b, y, c, tol=1e-2, grad_tol=3e-2, argmax_exact=False, margin=0.3)


@case("w3", "w2_ranks12")
def no_concepts(env):
    h, w, b, y, c, _ = make_inputs(env, 104)
    check(env, h, w, b, y, None)
    check(env, h, w, b, y, c[:, :0])


@case("w3", "w2")
def non_contiguous_inputs(env):
    from fused_concept.parallel import vocab_parallel_concept_loss

    h, w, b, y, c, _ = make_inputs(env, 105, bias=False)
    want = check(env, h, w, b, y, c, reduction="sum")[0]
    h_nc = torch.stack([h, -h], dim=2).reshape(h.shape[0], -1)[:, ::2]
    w_nc = w[env.block].t().contiguous().t()
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    got = vocab_parallel_concept_loss(h_nc, w_nc, y, c, group=env.group, reduction="sum")
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got, want)


@case()
def every_row_ignored(env):
    from fused_concept.parallel import vocab_parallel_concept_loss

    h, w, b, y, c, _ = make_inputs(env, 106)
    y = torch.full_like(y, -100)
    for reduction in ("mean", "sum"):
        h_r = h.clone().requires_grad_()
        w_r = w[env.block].clone().requires_grad_()
        loss = vocab_parallel_concept_loss(h_r, w_r, y, c, group=env.group, reduction=reduction)
        assert loss.item() == 0.0, loss
        loss.backward()
        assert torch.equal(h_r.grad, torch.zeros_like(h)) and torch.equal(w_r.grad, torch.zeros_like(w_r))


@case("w3", "w2", "w3_empty_rank")
def argmax_ties_break_to_lowest_id(env):
    """Integer data makes the logits exact, and every block after the first repeats the same rows:
    the maximum is held by several ranks at once; the lowest global id must win, on every rank."""
    n, d = 12, 6
    g = torch.Generator().manual_seed(env.seed + 7)
    h = torch.randint(1, 4, (n, d), generator=g).float()
    distinct = torch.randint(0, 4, (5, d), generator=g).float()
    w = distinct[torch.arange(env.vocab) % 5].clone()
    first = next(i for i, s in enumerate(env.sizes) if s)
    w[: env.sizes[first]] = 0.0  # the first block loses: ties are decided among the later ranks
    y = torch.randint(0, env.vocab, (n,), generator=g)
    c = torch.randint(0, env.vocab, (n, 3), generator=g)
    _, stats = check(env, h, w, None, y, c, reduction="sum")
    assert (stats.argmax >= env.sizes[first]).all()


@case("w3", "w2")
def nan_or_inf_in_one_block_gives_nan_everywhere(env):
    from fused_concept.parallel import vocab_parallel_concept_loss

    h, w, b, y, c, _ = make_inputs(env, 108)
    last = max(i for i, s in enumerate(env.sizes) if s)
    for bad in (float("nan"), float("inf")):
        w_r = w[env.block].clone()
        if env.rank == last:
            w_r[-1, 0] = bad
        loss, stats = vocab_parallel_concept_loss(h, w_r, y, c, group=env.group, return_stats=True)
        assert torch.isnan(loss), (bad, loss)
        if bad != bad:
            assert torch.isnan(stats.lse).all()
    h_nan = h.clone()
    h_nan[3, 2] = float("nan")  # replicated hidden: NaN on every rank
    loss = vocab_parallel_concept_loss(h_nan, w[env.block], y, c, group=env.group, reduction="sum")
    assert torch.isnan(loss), loss


@case("w3", "w2_ranks12")
def frozen_head_or_frozen_hidden(env):
    h, w, b, y, c, _ = make_inputs(env, 114)
    from fused_concept.parallel import vocab_parallel_concept_loss

    h64, w64, b64 = as_float64(h.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    ref, _ = contract_loss(h64, w64, y, c, bias=b64, margin=0.3)
    want = torch.autograd.grad(ref, (h64, w64, b64))
    # frozen head: only hidden gets a gradient (still all-reduced: the same on every rank)
    h_r = h.detach().clone().requires_grad_()
    w_r, b_r = w.detach()[env.block], b.detach()[env.block]
    vocab_parallel_concept_loss(h_r, w_r, y, c, group=env.group, bias=b_r, margin=0.3).backward()
    assert rel_err(h_r.grad, want[0]) < 1e-4 and all_equal_across_group(env, h_r.grad)
    # frozen hidden: only the local head block gets one
    w_r = w.detach()[env.block].clone().requires_grad_()
    vocab_parallel_concept_loss(h.detach(), w_r, y, c, group=env.group, bias=b_r, margin=0.3).backward()
    assert rel_err(w_r.grad, want[1][env.block]) < 1e-4


@case("w3_empty_rank")
def type_errors_on_every_rank(env):
    from fused_concept.parallel import vocab_parallel_concept_loss

    h, w, b, y, c, _ = make_inputs(env, 115)
    w_r = w[env.block]
    with pytest.raises(TypeError, match="targets"):
        vocab_parallel_concept_loss(h, w_r, y.float(), c, group=env.group)
    with pytest.raises(TypeError, match="dtype"):
        vocab_parallel_concept_loss(h.double(), w_r, y, c, group=env.group)
    with pytest.raises(ValueError, match="weight dtype differs"):
        vocab_parallel_concept_loss(h, w_r.double() if env.rank == 2 else w_r, y, c, group=env.group)


@case("w3", "w2_ranks12")
def bad_ids_raise_on_every_rank(env):
    from fused_concept.parallel import vocab_parallel_concept_loss

    h, w, b, y, c, _ = make_inputs(env, 109)
    w_r = w[env.block]
    # the id just past the LAST block is invalid, even though it is inside the first block's range
    y_bad = y.clone()
    y_bad[0] = env.vocab
    with pytest.raises(ValueError, match=rf"targets.*{env.vocab}"):
        vocab_parallel_concept_loss(h, w_r, y_bad, c, group=env.group)
    c_bad = c.clone()
    c_bad[4, 1] = env.vocab + 5
    with pytest.raises(ValueError, match=rf"concepts.*{env.vocab + 5}"):
        vocab_parallel_concept_loss(h, w_r, y, c_bad, group=env.group)
    # the group is still usable afterwards
    check(env, h, w, b, y, c, reduction="sum")


@case("w3")
def mismatched_ranks_raise_on_every_rank(env):
    from fused_concept.parallel import vocab_parallel_concept_loss

    h, w, b, y, c, _ = make_inputs(env, 110)
    w_r, b_r = w[env.block], b[env.block]
    rows = h.shape[0] - (1 if env.rank == 1 else 0)
    with pytest.raises(ValueError, match="rows of hidden differs"):
        vocab_parallel_concept_loss(h[:rows], w_r, y[:rows], c[:rows], group=env.group)
    with pytest.raises(ValueError, match="bias is None on rank 0"):
        vocab_parallel_concept_loss(h, w_r, y, c, group=env.group, bias=None if env.rank == 0 else b_r)
    with pytest.raises(ValueError, match="reference"):
        vocab_parallel_concept_loss(h, w_r, y, c, group=env.group, impl="reference")


def _paper_rows(y, c, lam, num_valid=None, num_content=None):
    """Row weights of the paper's objective written from the contract, independently of the package."""
    n = y.numel()
    yl, cl = y.reshape(-1).tolist(), c.reshape(n, -1).tolist()
    valid = [t != -100 for t in yl]
    content = [valid[i] and any(t != -1 for t in cl[i]) for i in range(n)]
    nv = sum(valid) if num_valid is None else num_valid
    nt = sum(content) if num_content is None else num_content
    alpha = [0.0 if not valid[i] else ((1 - lam) / nv if content[i] else 1 / nv) for i in range(n)]
    beta = [lam / nt if content[i] else 0.0 for i in range(n)]
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)


@case("w3", "w2_ranks12")
def paper_objective(env):
    from fused_concept import concept_objective
    from fused_concept.parallel import vocab_parallel_concept_objective

    h, w, b, y, c, _ = make_inputs(env, 111, lead=(3, 8))
    no_content, no_valid = torch.full_like(c, -1), torch.full_like(y, -100)
    for lam, margin, counts, y, c in ((0.5, 0.6, {}, y, c), (0.3, None, {"num_valid": 50, "num_content": 31}, y, c),
                                      (0.0, 0.6, {}, y, c), (1.0, 0.6, {}, y, c), (0.5, 0.6, {}, y, no_content),
                                      (0.5, 0.6, {}, no_valid, c)):
        h_r = h.detach().clone().requires_grad_()
        w_r = w[env.block].clone().requires_grad_()
        b_r = b[env.block].clone().requires_grad_()
        loss = vocab_parallel_concept_objective(h_r, w_r, y, c, group=env.group, lam=lam, margin=margin,
                                                bias=b_r, **counts)
        alpha, beta = _paper_rows(y, c, lam, **counts)
        h64, w64, b64 = as_float64(h.requires_grad_(), w.requires_grad_(), b.requires_grad_())
        ref, _ = contract_loss(h64, w64, y, c, bias=b64, ntp_weight=alpha, concept_weight=beta, margin=margin,
                               reduction="sum")
        assert rel_err(loss, ref) < 2e-5, (float(loss), float(ref))
        got = torch.autograd.grad(loss, (h_r, w_r, b_r))
        want = torch.autograd.grad(ref, (h64, w64, b64))
        assert rel_err(got[0], want[0]) < 1e-4
        assert rel_err(got[1], want[1][env.block]) < 1e-4
        assert rel_err(got[2], want[2][env.block]) < 1e-4
        single = concept_objective(h.detach(), w.detach(), y, c, lam=lam, margin=margin, bias=b.detach(),
                                   impl="torch", **counts)
        assert rel_err(loss, single) < 2e-5


@case("w3")
def non_member_of_the_group_raises(env):
    from fused_concept.parallel import vocab_parallel_concept_loss

    h, w, b, y, c, _ = make_inputs(env, 116)
    members = LAYOUTS["w2"][0]
    if dist.get_rank() not in members:  # no collective is entered: the others need not take part
        with pytest.raises(ValueError, match="not a member"):
            vocab_parallel_concept_loss(h, w[:5], y, c, group=env.groups["w2"])


@case("w3", "w2")
def communication_volume(env):
    """The bytes handed to all-reduce per call are exactly `communication_bytes(N, D)`: independent of
    V and K, and no backward all-reduce when hidden needs no gradient."""
    from fused_concept import parallel as fd

    seen = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        seen.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        for k, soft, hidden_grad, smooth in ((5, False, True, 0), (9, False, True, 0), (5, True, True, 0),
                                             (0, False, True, 0), (5, False, False, 0), (5, False, True, 0.1)):
            h, w, b, y, c, p = make_inputs(env, 112, n=20, d=12, k=max(k, 3), probs=soft)
            c = c[:, :k]
            p = None if p is None else p[:, :k]
            h = h.requires_grad_(hidden_grad)
            w_r = w[env.block].clone().requires_grad_()
            seen.clear()
            loss = fd.vocab_parallel_concept_loss(h, w_r, y, c, group=env.group, concept_probs=p,
                                                  mode="soft" if soft else "marginal", label_smoothing=smooth)
            loss.backward()
            want = fd.communication_bytes(20, 12, has_sets=k > 0, soft=soft, hidden_grad=hidden_grad,
                                          label_smoothing=smooth > 0)
            assert sum(seen) == want["total"], (k, soft, hidden_grad, seen, want)
            assert len(seen) == 2 + int(hidden_grad), seen
    finally:
        dist.all_reduce = real


@case("w3", "w2", "w3_empty_rank")
def sets_far_below_the_max(env):
    """Concept sets whose logits lie hundreds of nats below the row maximum: merging the set's
    log-sum-exp with the global max as the shift would underflow float32 to -inf (an infinite loss)."""
    n, d = 10, 16
    g = torch.Generator().manual_seed(env.seed + 11)
    h = torch.randn(n, d, generator=g) * 40.0
    w = torch.randn(env.vocab, d, generator=g)
    z = h.double() @ w.double().t()
    lowest = z.argsort(dim=1)[:, :4]  # the four least likely ids of each row, spread over the blocks
    y = lowest[:, 0].clone()
    c = lowest[:, 1:].clone()
    assert float((z.max(1).values - z.gather(1, lowest).max(1).values).min()) > 120.0
    check(env, h, w, None, y, c, include_target=False, reduction="none")
    check(env, h, w, None, y, c, torch.rand(n, 3, generator=g), mode="soft", reduction="sum")


@case("w2")
def triton_interpreter_path(env):
    """The Triton shard kernels (interpreter on CPU) plug into the same merge, when they exist."""
    import importlib.util

    if importlib.util.find_spec("fused_concept.backends.triton_path") is None:
        return "skip: fused_concept.backends.triton_path does not exist yet"
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return "skip: TRITON_INTERPRET is not set"
    h, w, b, y, c, _ = make_inputs(env, 113, n=8, d=16)
    check(env, h, w, b, y, c, impl="triton", margin=0.2)


# ------------------------------------------------------------------------------------------------
# the spawned ranks and the parent side
# ------------------------------------------------------------------------------------------------

def _worker(global_rank, init_file, seed, out_dir, only):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=global_rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        groups = {}
        for name, (ranks, _) in LAYOUTS.items():  # every rank creates every group, in the same order
            groups[name] = None if len(ranks) == WORLD else dist.new_group(list(ranks))
        for name, (ranks, sizes) in LAYOUTS.items():
            if global_rank not in ranks:
                continue
            grank = ranks.index(global_rank)
            env = Env(name, groups[name], sizes, grank, sum(sizes[:grank]), sum(sizes), seed, groups)
            for case_name, (fn, layouts) in CASES.items():
                if name not in layouts or not re.search(only, f"{name}/{case_name}"):
                    continue
                try:
                    outcome = fn(env)
                    results[f"{name}/{case_name}"] = outcome if isinstance(outcome, str) else "ok"
                except BaseException as exc:  # pytest.raises' "DID NOT RAISE" is not an Exception
                    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                        raise
                    results[f"{name}/{case_name}"] = "fail: " + traceback.format_exc(limit=6)
    finally:
        with open(os.path.join(out_dir, f"rank{global_rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _all_keys():
    return [f"{lay}/{name}" for lay in LAYOUTS for name, (_, layouts) in CASES.items() if lay in layouts]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    seed = int(os.environ.get("FC_DIST_SEED", random.randrange(1, 10 ** 6)))
    work = tmp_path_factory.mktemp("distributed")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(work / "store"), seed, str(work), ONLY), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for i in hung:
        procs[i].terminate()
        procs[i].join(5)
    per_rank = {}
    for r in range(WORLD):
        path = work / f"rank{r}.json"
        per_rank[r] = json.loads(path.read_text()) if path.exists() else {}
    codes = [p.exitcode for p in procs]
    return seed, per_rank, hung, codes


@pytest.mark.parametrize("key", _all_keys())
def test_vocab_parallel(rank_results, key):
    if not re.search(ONLY, key):
        pytest.skip(f"not selected by FC_DIST_CASES={ONLY!r}")
    seed, per_rank, hung, codes = rank_results
    layout = key.split("/")[0]
    ranks = LAYOUTS[layout][0]
    verdicts = {r: per_rank[r].get(key, f"missing (exit code {codes[r]}, hung ranks {hung})") for r in ranks}
    bad = {r: v for r, v in verdicts.items() if v != "ok" and not v.startswith("skip")}
    if bad:
        pytest.fail(f"seed {seed} (FC_DIST_SEED={seed} replays it):\n"
                    + "\n".join(f"rank {r}: {v}" for r, v in bad.items()))
    skips = {v for v in verdicts.values() if v.startswith("skip")}
    if skips:
        pytest.skip("; ".join(sorted(skips)))


def test_communication_bytes_formula():
    from fused_concept.parallel import communication_bytes

    got = communication_bytes(1000, 64)
    assert got == {"forward_max": 16000, "forward_sum": 12000, "backward_hidden": 256000, "total": 284000}
    assert communication_bytes(10, 8, has_sets=False, soft=False, hidden_grad=False)["total"] == 80 + 80
    assert communication_bytes(10, 8, has_sets=False, hidden_grad=False, label_smoothing=True)["total"] == 80 + 120


def test_needs_an_initialised_group():
    from fused_concept.parallel import vocab_parallel_concept_loss

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="process group"):
        vocab_parallel_concept_loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]))


def test_float_order_key_round_trip_and_order():
    """The MAX-merge encoding: exact round trip, integer order = float order, -0.0 ties +0.0."""
    from fused_concept.parallel.vocab import _from_key, _order_key

    g = torch.Generator().manual_seed(random.randrange(10 ** 6))
    x = torch.cat([torch.randn(500, generator=g) * 10.0 ** torch.randint(-40, 38, (500,), generator=g).float(),
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4e38, -3.4e38])])
    key = _order_key(x)
    back = _from_key(key)
    assert torch.equal(back, x + 0.0) and not torch.signbit(_from_key(_order_key(torch.tensor([-0.0])))).any()
    order = x.argsort(stable=True)
    assert (key[order].diff() >= 0).all()
    assert ((key[order].diff() == 0) == (x[order].diff() == 0)).all()
