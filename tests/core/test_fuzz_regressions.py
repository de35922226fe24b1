"""Failures the property-based tests (tests/core/test_fuzz.py) found, kept as ordinary tests: each is the
drawn example that failed, checked against the float64 contract the same way (`check_case`)."""
import dataclasses

import pytest
import torch

import fused_concept as fc
from helpers.fuzz import Case, check_case

PLAIN = Case(seed=0, lead=(7,), v=50, d=5, k=3, dtype=torch.float32, hidden_layout="contiguous",
             weight_layout="contiguous", bias="none", masked_ids=0, logit_scale=1.0, ignore_index=-100,
             ignored_rate=0.0, pad_rate=0.0, duplicates=False, gold_in_set=False, empty_rows=False,
             mode="marginal", margin_quantile=None, include_target=False, reduction="mean", softcap=None,
             z_loss=0.0, ntp_weight=1.0, concept_weight=1.0, grads="all")


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_no_rows_in_soft_mode(impl):
    """prepare() reshaped concept_probs with -1, which is ambiguous for N = 0 (every impl failed)."""
    check_case(impl, dataclasses.replace(PLAIN, lead=(0,), v=600, d=9, k=5, mode="soft", bias="contiguous",
                                         masked_ids=1, reduction="none", softcap=0.5, z_loss=1e-4))


def test_no_rows_on_the_torch_path():
    """The torch path built no chunk for N = 0 and then failed to concatenate zero chunks' statistics."""
    check_case("torch", dataclasses.replace(PLAIN, lead=(0,), v=1337, d=125, k=24, dtype=torch.float64,
                                            reduction="sum", z_loss=1e-4, concept_weight="rows"))


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_soft_mode_pad_next_to_a_masked_id_zero(impl):
    """The reference multiplied the pads' weight 0 by the logit of id 0 (its stand-in index): NaN when
    id 0 is masked by a -inf bias."""
    g = torch.Generator().manual_seed(1)
    h, w, b = torch.randn(4, 6, generator=g), torch.randn(30, 6, generator=g), torch.randn(30, generator=g)
    b[0] = float("-inf")
    y = torch.tensor([3, 4, 5, 6])
    c = torch.tensor([[7, -1], [8, 9], [-1, -1], [10, -1]])
    p = torch.rand(4, 2, generator=g)
    loss = fc.concept_loss(h, w, y, c, bias=b, mode="soft", concept_probs=p, impl=impl, reduction="none")
    assert torch.isfinite(loss).all()
    want = fc.concept_loss(h, w, y, c, bias=b.clamp(min=-1e4), mode="soft", concept_probs=p, impl="torch",
                           reduction="none")
    assert torch.allclose(loss, want, rtol=1e-5)


def test_triton_softcap_far_above_the_logits():
    """softcap = 1e4 over logits of about 8: the kernels' tanh (1 - 2 / (exp(2 z / c) + 1)) loses about
    softcap * 2**-24 absolutely (3e-4 in ce here) where torch.tanh is exact to the float32 rounding of z.
    The fuzz bounds allow 4 * 2**-24 * softcap for the Triton path; this pins the case that showed it."""
    check_case("triton", dataclasses.replace(PLAIN, seed=474, lead=(2,), v=62, d=3, k=3, dtype=torch.bfloat16,
                                             hidden_layout="strided", weight_layout="transposed", bias="strided",
                                             masked_ids=1, logit_scale=1e-3, ignore_index=-7, ignored_rate=0.2,
                                             pad_rate=1.0, duplicates=True, gold_in_set=True, margin_quantile=0.16,
                                             concept_weight=2.5, grads="hidden", softcap=1e4))
    check_case("triton", dataclasses.replace(PLAIN, seed=598653281, lead=(5,), v=699, d=33, k=4,
                                             dtype=torch.float16, weight_layout="transposed", logit_scale=8.0,
                                             ignore_index=0, ignored_rate=1.0, pad_rate=1.0, include_target=True,
                                             reduction="none", softcap=1e4, z_loss=0.01, ntp_weight=0.0,
                                             concept_weight=2.5))


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_masked_concept_id_under_a_large_softcap(impl):
    """A masked id (-inf bias) under softcap = 1e4 is the finite logit -1e4, so the concept term is about
    1e4 while every product h . w is tiny: float32 rounds it at 1e4's scale. (The bound was too tight: it
    looked at |h| |w| and the row's lse only.)"""
    check_case(impl, dataclasses.replace(PLAIN, seed=0, lead=(1,), v=2, d=1, k=1, bias="contiguous", masked_ids=1,
                                         logit_scale=1e-3, softcap=1e4))
