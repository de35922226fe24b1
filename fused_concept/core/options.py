"""`LossOptions`: the keywords of the loss (docs/math.md), checked once and carried whole from the front door
through `prepare`, the registered ops, the vocab-parallel loss and the fused head.

How the loss is computed (`impl`, `kernel_options`) and what is returned (`return_stats`) are not options
of the loss: they travel beside it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor

MODES = ("marginal", "soft")
REDUCTIONS = ("mean", "sum", "none")

RowWeight = Union[float, int, Tensor]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class LossOptions:
    """The options of the loss, each as `concept_loss` documents it:

    ntp_weight, concept_weight   weights of the token and the concept term (floats, or tensors shaped like
                                 targets; no gradient)
    margin                       hinge: a row's concept term counts while its set's mass is below it (None: off)
    mode                         "marginal" (the set's probability mass) or "soft" (weights concept_probs)
    include_target               the gold id joins every listed set
    ignore_index                 targets equal to it count nowhere
    reduction                    "mean" (over the rows that count), "sum" or "none"
    softcap                      logits softcap * tanh(z / softcap) (None: off)
    z_loss                       + z_loss * lse^2 per row
    label_smoothing              the token term against (1 - eps) onehot(y) + eps / V (torch's CrossEntropyLoss)
    shift                        row t predicts targets[..., t + 1] (unshifted hidden and targets; no copy of hidden)
    """

    ntp_weight: RowWeight = 1.0
    concept_weight: RowWeight = 1.0
    margin: Optional[float] = None
    mode: str = "marginal"
    include_target: bool = True
    ignore_index: int = -100
    reduction: str = "mean"
    softcap: Optional[float] = None
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    shift: bool = False

    def __post_init__(self):
        _check_choices(self)
        _check_numbers(self)

    def replace(self, **changes) -> "LossOptions":
        return dataclasses.replace(self, **changes)


# the field names, read once here: torch.compile cannot trace dataclasses.fields of a class
FIELDS = tuple(f.name for f in dataclasses.fields(LossOptions))


def _check_choices(o: LossOptions) -> None:
    if o.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {o.mode!r}")
    if o.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {o.reduction!r}")
    for name in ("include_target", "shift"):
        value = getattr(o, name)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    if isinstance(o.ignore_index, bool) or not isinstance(o.ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(o.ignore_index).__name__} {o.ignore_index!r}")
    for name in ("ntp_weight", "concept_weight"):
        value = getattr(o, name)
        if not isinstance(value, Tensor) and not _is_number(value):
            raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__} {value!r}")


def _check_numbers(o: LossOptions) -> None:
    if o.margin is not None and not _is_number(o.margin):
        raise TypeError(f"margin must be None or a float, got {type(o.margin).__name__} {o.margin!r}")
    if o.margin is not None and not 0 < o.margin <= 1:
        raise ValueError(f"margin must be None or in (0, 1] (a probability mass; None turns the hinge off), "
                         f"got {o.margin!r}")
    if o.softcap is not None and not (_is_number(o.softcap) and 0 < o.softcap < math.inf):
        raise ValueError(f"softcap must be None or a positive finite float, got {o.softcap!r}")
    if not (_is_number(o.z_loss) and 0 <= o.z_loss < math.inf):
        raise ValueError(f"z_loss must be a non-negative finite float, got {o.z_loss!r}")
    if not (_is_number(o.label_smoothing) and 0 <= o.label_smoothing <= 1):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {o.label_smoothing!r}")
