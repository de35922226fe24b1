"""The fuzz tests' example (`Case`), how one is built into inputs, the dtype-aware tolerance model
(`Bounds`) and `check_case`, shared by tests/core/test_fuzz.py and its regressions."""
import contextlib
import dataclasses
import math
from typing import Optional, Tuple

import torch

import fused_concept as fc
from helpers.contract import as_float64, contract_loss

UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# the largest |logit| drawn per dtype: beyond these the rounding of 16-bit logits (torch path) or of the
# 16-bit gradient tiles (triton) is the whole signal; float32 goes to 1e4, as the issue asks
MAX_SCALE = {torch.float64: 1e4, torch.float32: 1e4, torch.bfloat16: 30.0, torch.float16: 300.0}


@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn example. Tensors are generated from `seed`; everything else is structure and options."""

    seed: int
    lead: Tuple[int, ...]  # hidden's leading shape (N = product)
    v: int
    d: int
    k: int
    dtype: torch.dtype
    hidden_layout: str  # contiguous | transposed | strided
    weight_layout: str
    bias: str  # none | contiguous | strided
    masked_ids: int  # ids whose bias is -inf
    logit_scale: float  # max |z| over the example
    ignore_index: int
    ignored_rate: float
    pad_rate: float
    duplicates: bool
    gold_in_set: bool
    empty_rows: bool
    mode: str
    margin_quantile: Optional[float]  # None: no margin; else where the margin sits among the row masses
    include_target: bool
    reduction: str
    softcap: Optional[float]
    z_loss: float
    ntp_weight: object  # float, or "rows" for a per-row tensor
    concept_weight: object
    grads: str  # all | hidden | none
    kernel_options: Tuple[Tuple[str, object], ...] = ()  # impl="triton" only: the backward's switches

    @property
    def n(self) -> int:
        return math.prod(self.lead)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (never contiguous unless the shape forces it)."""
    if layout == "transposed":
        if t.dim() == 3:
            return t.transpose(0, 1).contiguous().transpose(0, 1)
        return t.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def build(case: Case):
    """Tensors of `case`: (hidden, weight, bias, targets, concepts, concept_probs, call options)."""
    g = torch.Generator().manual_seed(case.seed)
    n, v, d, k = case.n, case.v, case.d, case.k
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if case.bias != "none" else None
    # scale so that the largest |logit| is logit_scale
    z = h @ w.t() + (0.0 if b is None else b)
    top = float(z.abs().max()) if z.numel() else 1.0
    factor = case.logit_scale / max(top, 1e-30)
    h = h * factor
    if b is not None:
        b = b * factor
        masked = torch.randperm(v, generator=g)[: case.masked_ids]
        b[masked] = float("-inf")

    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < case.ignored_rate] = case.ignore_index
    c = torch.randint(0, v, (n, k), generator=g)
    if k:
        c[torch.rand(n, k, generator=g) < case.pad_rate] = -1
        if case.duplicates and k > 1:
            c[:, k // 2] = c[:, 0]
        if case.gold_in_set:
            rows = torch.rand(n, generator=g) < 0.5
            c[rows, k - 1] = torch.where(y[rows] >= 0, y[rows], c[rows, k - 1])
        if case.empty_rows:
            c[torch.rand(n, generator=g) < 0.3] = -1
    probs = (torch.rand(n, k, generator=g, dtype=torch.float64) * 0.95 + 0.05) if case.mode == "soft" else None

    def row_weight(choice):
        return torch.rand(n, generator=g) * 2.0 if choice == "rows" else choice

    options = dict(mode=case.mode, include_target=case.include_target, reduction=case.reduction,
                   softcap=case.softcap, z_loss=case.z_loss, ignore_index=case.ignore_index,
                   ntp_weight=row_weight(case.ntp_weight), concept_weight=row_weight(case.concept_weight))
    dt = case.dtype
    hidden = _layout(h.to(dt).reshape(*case.lead, d), case.hidden_layout)
    weight = _layout(w.to(dt), case.weight_layout)
    bias = None if b is None else _layout(b.to(dt)[None], case.bias)[0]
    for t, want in ((hidden, case.grads != "none"), (weight, case.grads == "all"), (bias, case.grads == "all")):
        if t is not None:
            t.requires_grad_(want)
    targets = y.reshape(case.lead)
    concepts = c.reshape(*case.lead, k)
    if isinstance(options["ntp_weight"], torch.Tensor):
        options["ntp_weight"] = options["ntp_weight"].reshape(case.lead)
    if isinstance(options["concept_weight"], torch.Tensor):
        options["concept_weight"] = options["concept_weight"].reshape(case.lead)
    concept_probs = None if probs is None else probs.to(torch.float32).reshape(*case.lead, k)
    return hidden, weight, bias, targets, concepts, concept_probs, options


def place_margin(case: Case, masses: torch.Tensor, slack: torch.Tensor) -> Optional[float]:
    """A margin at `case.margin_quantile` among the row masses that no mass is within its error of
    (the hinge is a step: a margin inside a mass's rounding would make the comparison a coin toss)."""
    if case.margin_quantile is None:
        return None
    points = sorted(set([0.0, 1.0] + masses.tolist()))  # a margin is a mass: in (0, 1]
    gaps = [(lo, hi) for lo, hi in zip(points, points[1:])]
    lo, hi = gaps[min(int(case.margin_quantile * len(gaps)), len(gaps) - 1)]
    margin = 0.5 * (lo + hi)
    near = (masses - margin).abs() <= 4 * slack
    if bool(near.any()):
        lo, hi = max(gaps, key=lambda gap: gap[1] - gap[0])
        margin = 0.5 * (lo + hi)
        if bool(((masses - margin).abs() <= 4 * slack).any()):
            return None
    return margin


# ------------------------------------------------------------------------------------------- the bounds
class Bounds:
    """Error bounds of one example, from float64 logits of the (rounded) inputs.

    u_z: unit roundoff of the logits: the float32 accumulator (x a summation factor) for every path,
    and the input dtype's for the torch path and Triton's strategy "rows" on 16-bit inputs (they round
    h W^T to the input dtype before the float32 softmax). A row's logits then err by delta_i = u_z * M_i,
    with M_i = max_v (|h_i| . |W_v| + |b_v|). Row statistics inherit delta_i (ce: 2 delta_i), the softmax a relative error of about
    2 delta_i; gradients add the rounding of their output dtype."""

    def __init__(self, impl, hidden, weight, bias, targets, concepts, probs, case: Case):
        n, d = case.n, case.d
        h = hidden.detach().double().reshape(n, d)
        w = weight.detach().double()
        b = None if bias is None else bias.detach().double()
        finite_b = None if b is None else torch.where(torch.isfinite(b), b, torch.zeros_like(b))
        z = h @ w.t() + (0.0 if b is None else b)
        if case.softcap is not None:
            z = case.softcap * torch.tanh(z / case.softcap)
        magnitude = h.abs() @ w.abs().t() + (0.0 if b is None else finite_b.abs())
        # a logit is never rounded more finely than its own size: a masked id under a softcap is -softcap
        magnitude = torch.maximum(magnitude, torch.where(torch.isfinite(z), z.abs(), torch.zeros_like(z)))
        m = magnitude.max(dim=1).values if n else torch.zeros(0, dtype=torch.float64)
        self.magnitude = m  # [N]: the largest |logit| (or product of magnitudes) of each row
        acc_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
        u_z = UNIT[acc_dtype] * (4.0 + 2.0 * math.sqrt(d))
        u_in = UNIT[case.dtype]
        # the torch path and Triton's strategy "rows" take 16-bit logits from the matrix product
        rows = dict(case.kernel_options).get("strategy") == "rows"
        if (impl == "torch" or rows) and case.dtype in (torch.bfloat16, torch.float16):
            u_z = u_z + u_in
        self.delta = u_z * (m + 1.0)  # [N]
        if impl == "triton" and case.softcap is not None:
            # the kernels form tanh as 1 - 2 / (exp(2 z / c) + 1): an absolute error of a few u * softcap
            # whatever |z| (the cancellation near z = 0); see the report of issue 13
            self.delta = self.delta + 4 * UNIT[torch.float32] * case.softcap
        # rounding of the row math and sums; float32 even for float64 inputs, whose per-row weights
        # (ntp_weight, concept_weight) are float32 like everyone's
        self.acc = UNIT[torch.float32] * 64
        self.z = z
        self.p = torch.softmax(z, dim=1)
        self.u_out = u_in
        # 16-bit triton gradients pass through 16-bit logit-gradient tiles before their products
        self.u_dz = u_in if (impl == "triton" and case.dtype != torch.float32) else 0.0
        y, c = targets.reshape(n), concepts.reshape(n, case.k)
        self.valid = y != case.ignore_index
        self.listed = _listed(c, torch.where(self.valid, y, -1), case.v)
        self.soft_mass = None if probs is None else (probs.reshape(n, case.k).double().abs() * (c >= 0)).sum(1)


def _listed(concepts, targets, v):
    """[N, V] float64: 1 at the ids whose logit gradient has a sparse term (target, listed concept ids)."""
    ids = torch.cat([concepts, targets[:, None]], dim=1)
    listed = torch.zeros(ids.shape[0], v + 1, dtype=torch.float64)
    listed.scatter_(1, torch.where(ids >= 0, ids, v), 1.0)
    return listed[:, :v]


def per_row(x, n):
    return x.reshape(n).double() if isinstance(x, torch.Tensor) else torch.full((n,), float(x), dtype=torch.float64)


def assert_close(name, got, want, bound):
    """Elementwise |got - want| <= bound, infinities equal; a message that names the worst element."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
    special = ~torch.isfinite(want)  # +-inf must match exactly; NaN (0 * inf) must be NaN too
    g_s, w_s = got[special], want[special]
    same = torch.equal(torch.isnan(g_s), torch.isnan(w_s)) and torch.equal(g_s[~w_s.isnan()], w_s[~w_s.isnan()])
    assert same, (name, "non-finite entries differ", g_s[:5], w_s[:5])
    fin = ~special
    err = (got[fin] - want[fin]).abs()
    bound = bound.expand_as(want)[fin] if isinstance(bound, torch.Tensor) else torch.full_like(err, bound)
    bad = ~(err <= bound)
    if bool(bad.any()):
        j = int((err - bound).argmax())
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} entries off; worst got "
                             f"{float(got[fin][j])!r} want {float(want[fin][j])!r} bound {float(bound[j]):.3g}")


# --------------------------------------------------------------------------------------------- the check
@contextlib.contextmanager
def one_thread():
    """The examples are small: on a shared 2-core machine, waking a second OpenMP thread for each of the
    contract's many small row operations cost 20x the work itself (measured: 38 s vs 1.9 s for one
    example at N = 232, V = 2479)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_case(impl: str, case: Case) -> None:
    with one_thread():
        _check_case(impl, case)


def _check_case(impl: str, case: Case) -> None:
    hidden, weight, bias, targets, concepts, probs, opts = build(case)
    n = case.n
    h64, w64, b64 = as_float64(hidden, weight, bias)
    p64 = None if probs is None else probs.double()
    contract_opts = dict(opts)
    bounds = Bounds(impl, hidden, weight, bias, targets, concepts, probs, case)

    # the margin is placed away from every row's mass (contract masses, their error bound as slack)
    _, free = contract_loss(h64.detach(), w64.detach(), targets, concepts,
                            bias=None if b64 is None else b64.detach(), concept_probs=p64,
                            **{**contract_opts, "reduction": "none"})
    mass_slack = free["mass"].reshape(n) * 3 * bounds.delta + bounds.acc
    margin = place_margin(case, free["mass"].reshape(n), mass_slack)
    opts["margin"] = contract_opts["margin"] = margin

    loss, stats = fc.concept_loss(hidden, weight, targets, concepts, bias=bias, concept_probs=probs, impl=impl,
                                  return_stats=True, kernel_options=dict(case.kernel_options) or None, **opts)
    ref, ref_stats = contract_loss(h64, w64, targets, concepts, bias=b64, concept_probs=p64, **contract_opts)

    # statistics
    delta, acc = bounds.delta, bounds.acc
    lse_want = ref_stats["lse"].reshape(n)
    assert_close("lse", stats.lse.reshape(n), lse_want, delta + acc * (lse_want.abs() + 1))
    ce_want = ref_stats["ce"].reshape(n)
    assert_close("ce", stats.ce.reshape(n), ce_want, 2 * delta + acc * (ce_want.abs() + lse_want.abs() + 1))
    mass_want = ref_stats["mass"].reshape(n)
    assert_close("mass", stats.mass.reshape(n), mass_want, mass_want * 3 * delta + acc)
    if n:
        arg = stats.argmax.reshape(n)
        top = bounds.z.max(dim=1).values
        picked = bounds.z.gather(1, arg[:, None]).squeeze(1)
        assert bool((picked >= top - 2 * delta - acc * (top.abs() + 1)).all()), "argmax is not a maximal logit"

    # loss rows: ce (2 delta), the concept term (delta + delta * sum|w|), z_loss (2 |lse| delta)
    alpha, beta = per_row(opts["ntp_weight"], n), per_row(opts["concept_weight"], n)
    concept_delta = delta * (1.0 + (bounds.soft_mass if bounds.soft_mass is not None else 1.0))
    row_bound = (alpha.abs() * 2 * delta + beta.abs() * concept_delta + 2 * case.z_loss * lse_want.abs() * delta)
    lse_fin = torch.where(torch.isfinite(lse_want), lse_want, torch.zeros_like(lse_want))
    # the size of each term of the row (|cl| <= |lse| + |set_lse| <= |lse| + M), for the float32 rounding
    concept_size = (lse_fin.abs() + bounds.magnitude) * (1.0 + (bounds.soft_mass if bounds.soft_mass is not None
                                                                 else 1.0))
    row_size = alpha.abs() * ce_want.abs() + beta.abs() * concept_size + case.z_loss * lse_fin ** 2
    row_bound = torch.where(bounds.valid, row_bound + acc * (row_size + 1), torch.zeros_like(row_bound))
    if case.reduction == "none":
        assert_close("loss rows", loss.reshape(n), ref.reshape(n), row_bound)
    else:
        scale = 1.0 if case.reduction == "sum" else 1.0 / max(1, int(bounds.valid.sum()))
        total = (row_bound.sum() + acc * n * row_size.sum()) * scale
        assert_close("loss", loss, ref, total + 1e-30)

    # gradients
    params = [(name, t, t64) for name, t, t64 in (("hidden", hidden, h64), ("weight", weight, w64),
                                                    ("bias", bias, b64)) if t is not None and t.requires_grad]
    if not params:
        return
    up = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case.seed)) \
        if loss.dim() else torch.tensor(1.7, dtype=torch.float64)
    got = torch.autograd.grad(loss, [t for _, t, _ in params], up.to(loss.dtype))
    want = torch.autograd.grad(ref, [t for _, _, t in params], up, allow_unused=True)
    if any(wt is not None and not torch.isfinite(wt).all() for wt in want):
        return  # a concept set whose every id is masked: its float64 gradient is 0/0 (the package takes q = 0)
    _check_grads(impl, case, bounds, params, got, want, up, alpha, beta, lse_fin, h64, w64)


def _check_grads(impl, case, bounds, params, got, want, up, alpha, beta, lse_fin, h64, w64) -> None:
    """The gradients of `_check_case` against their float64 values, within the error model of `Bounds`."""
    n, delta, acc = case.n, bounds.delta, bounds.acc
    # |d loss / d z_iv| <= G_i (p_iv + listed_iv); its error <= eps_i G_i (p_iv + listed_iv)
    g = up.reshape(n) if case.reduction == "none" else torch.full((n,), float(up), dtype=torch.float64)
    if case.reduction == "mean":
        g = g / max(1, int(bounds.valid.sum()))
    soft_w = bounds.soft_mass if bounds.soft_mass is not None else torch.ones(n, dtype=torch.float64)
    big_g = g.abs() * (alpha.abs() + beta.abs() * (1 + soft_w) + 2 * case.z_loss * (lse_fin.abs() + 1))
    big_g = torch.where(bounds.valid, big_g, torch.zeros_like(big_g))
    eps = torch.expm1(2.5 * delta) + bounds.u_dz + acc * 4
    if case.softcap is not None:  # the factor 1 - tanh^2 moves by at most delta / softcap
        eps = eps + delta / case.softcap
    shape_dz = bounds.p + bounds.listed
    # plus an absolute floor for probabilities below float32's normal range (subnormal, or flushed to 0)
    err_dz = (eps * big_g)[:, None] * shape_dz + big_g[:, None] * torch.finfo(torch.float32).smallest_normal
    rows = dict(case.kernel_options).get("strategy") == "rows"
    if rows and case.dtype == torch.float16:
        # its logit gradient is stored in float16 even under the interpreter: entries below float16's normal
        # range are rounded to its subnormal spacing (2^-24), in units of the forward's gradient when fused
        spacing = torch.finfo(torch.float16).smallest_normal * torch.finfo(torch.float16).eps
        err_dz = err_dz + spacing * (float(up.abs().max()) if case.reduction != "none" else 1.0)
    size_dz = big_g[:, None] * shape_dz
    hd = h64.detach().reshape(n, case.d).abs()
    wd = w64.detach().abs()
    # a gradient formed in the forward (torch path, Triton's "rows" with "mean" / "sum") is rounded to its dtype
    # there and again when the backward scales it by the upstream scalar: two roundings
    fused = case.reduction != "none" and (impl == "torch" or dict(case.kernel_options).get("strategy") == "rows")
    roundings = 2 if fused else 1
    u_out = bounds.u_out * roundings
    for (name, t, _), g_got, g_want in zip(params, got, want):
        assert g_got.dtype == t.dtype, (name, g_got.dtype, t.dtype)
        if g_want is None:
            g_want = torch.zeros_like(t, dtype=torch.float64)
        if name == "hidden":
            err, size = err_dz @ wd, size_dz @ wd
        elif name == "weight":
            err, size = err_dz.t() @ hd, size_dz.t() @ hd
        else:
            err, size = err_dz.sum(0), size_dz.sum(0)
        tiny = torch.finfo(t.dtype).smallest_normal * torch.finfo(t.dtype).eps * roundings  # subnormal spacing
        bound = err + (u_out + acc) * size + tiny
        assert_close(f"d_{name}", g_got.reshape(bound.shape), g_want.reshape(bound.shape), bound)
