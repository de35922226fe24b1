"""Property-based tests: hypothesis draws shapes (N 0..300, V 1..5000, D 1..130, K 0..40), dtypes, every
option of `concept_loss`, 3-D and non-contiguous inputs, -1 / duplicate / gold-in-set id patterns, custom
ignore_index values, masked (-inf bias) ids and logits up to |z| = 1e4 with and without a softcap, and
compares impl "reference", "torch" and "triton" (Triton's interpreter on CPU, smaller shapes, and the
backward's exact kernel_options) with the float64 contract of tests/helpers/contract.py: loss, every statistic
and every gradient.

Tolerances follow the rounding of the inputs' dtype at the example's logit scale (see `Bounds`): a
logit formed from terms of magnitude M carries an error of about u * M (u the unit roundoff of the
precision the logits are formed in), which every statistic inherits and the softmax turns into a
relative error of about 2 u M in the gradient. Nothing wider.

Budget: CI runs the "ci" profile (derandomized: the same examples every run, no example database);
`make fuzz` runs the "fuzz" profile (HYPOTHESIS_PROFILE=fuzz: fresh random examples, many more of
them). A failure prints the drawn `Case`; turn it into a regression test in test_fuzz_regressions.py.
"""
import dataclasses
import os
from typing import Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.fuzz import MAX_SCALE, Case, check_case

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("fuzz", derandomize=False, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
# examples per test in each profile: (reference / torch, triton)
EXAMPLES = {"ci": (80, 10), "fuzz": (2000, 200)}[PROFILE]

@dataclasses.dataclass(frozen=True)
class Limits:
    n: int
    v: int
    d: int
    k: int
    dtypes: Tuple[torch.dtype, ...]


BIG = Limits(n=300, v=5000, d=130, k=40, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64))
SMALL = Limits(n=40, v=700, d=40, k=6, dtypes=(torch.float32, torch.bfloat16, torch.float16))  # interpreter
# the Triton backward's exact variants (filter_eps > 0 is approximate by design: kernels/README.md)
KERNEL_OPTIONS = ((), (("deterministic", False),), (("strategy", "recompute_sweep"),), (("strategy", "rows"),),
                  (("chunk_rows", 16), ("strategy", "rows")))


@st.composite
def cases(draw, limits: Limits) -> Case:
    n = draw(st.integers(0, limits.n))
    lead = (n,)
    if n > 0 and draw(st.booleans()):  # 3-D hidden [a, b, D]
        a = draw(st.sampled_from([f for f in range(1, n + 1) if n % f == 0]))
        lead = (a, n // a)
    dtype = draw(st.sampled_from(limits.dtypes))
    v = draw(st.integers(1, limits.v))
    bias = draw(st.sampled_from(["none", "contiguous", "strided"]))
    softcap = draw(st.sampled_from([None, None, 0.5, 5.0, 30.0, 1e4]))
    return Case(
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        lead=lead,
        v=v,
        d=draw(st.integers(1, limits.d)),
        k=draw(st.integers(0, limits.k)),
        dtype=dtype,
        hidden_layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        weight_layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        bias=bias,
        masked_ids=draw(st.integers(0, min(3, v - 1))) if bias != "none" else 0,
        logit_scale=draw(st.sampled_from([1e-3, 1.0, 8.0, 30.0, 300.0, 1e3, 1e4]).filter(
            lambda s: s <= MAX_SCALE[dtype])),
        ignore_index=draw(st.sampled_from([-100, -1, -7, 0])),
        ignored_rate=draw(st.sampled_from([0.0, 0.2, 1.0])),
        pad_rate=draw(st.sampled_from([0.0, 0.3, 0.9, 1.0])),
        duplicates=draw(st.booleans()),
        gold_in_set=draw(st.booleans()),
        empty_rows=draw(st.booleans()),
        mode=draw(st.sampled_from(["marginal", "soft"])),
        margin_quantile=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        include_target=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        softcap=softcap,
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-4, 1e-2])),
        ntp_weight=draw(st.sampled_from([1.0, 0.0, 0.7, "rows"])),
        concept_weight=draw(st.sampled_from([1.0, 0.0, 2.5, "rows"])),
        grads=draw(st.sampled_from(["all", "all", "hidden", "none"])),
        kernel_options=draw(st.sampled_from(KERNEL_OPTIONS)) if limits is SMALL else (),
    )


# ----------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("impl", ["reference", "torch"])
@settings(max_examples=EXAMPLES[0])
@given(case=cases(BIG))
def test_matches_contract(impl, case):
    check_case(impl, case)


@settings(max_examples=EXAMPLES[1])
@given(case=cases(SMALL))
def test_triton_matches_contract(case):
    check_case("triton", case)
