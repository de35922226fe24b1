"""What the loss functions return: the reduced loss and, when asked, the per-row statistics, shaped
like `targets`. One tail for the single-device and the vocab-parallel loss."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from fused_concept.core.inputs import Canonical


class ConceptStats(NamedTuple):
    """Per-row statistics, shaped like `targets`. `ce` is 0 on ignored rows; `mass` (probability of
    the concept set) is 0 on rows whose concepts list no id; `lse` and `argmax` cover every row."""

    lse: Tensor
    ce: Tensor
    mass: Tensor
    argmax: Tensor


def finish(loss: Tensor, stats: ConceptStats, canon: Canonical, *, reduction: str, return_stats: bool):
    """`loss` (reduced, or [N] rows for reduction="none") and flat [N] stats -> the user's shapes (without the
    last position of each sequence when the rows were shifted)."""
    def shaped(t: Tensor) -> Tensor:
        t = t.reshape(canon.lead_shape)
        return t[..., :-1] if canon.shifted else t

    if reduction == "none":
        loss = shaped(loss)
    if not return_stats:
        return loss
    return loss, ConceptStats(*(shaped(t) for t in stats))
