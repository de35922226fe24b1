"""The LM head as the fused loss sees it: ``logits = softcap * tanh(scale * (W h + b) / softcap)`` (no tanh
without a softcap).

:class:`Head` holds ``W``, ``b``, the logit ``scale`` and ``softcap``; :meth:`Head.fold` gives the
``(hidden, bias)`` that ``concept_loss(hidden, head.weight, ..., bias=bias, softcap=head.softcap)`` needs (the
scale folded in) and :meth:`Head.logits` the logits themselves, for the few places that want them (tests,
concept building, ``return_logits``). How a transformers model's config fills these in is
``fused_concept.integrations.hf.model_head``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Head:
    """An LM head: ``weight`` [V, D] (the model's own Parameter, or a view of it), ``bias`` [V] or None,
    the logit ``scale`` and the ``softcap`` (None when the model has none)."""

    weight: Tensor
    bias: Optional[Tensor]
    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def of_module(cls, module, *, scale: float = 1.0, softcap: Optional[float] = None,
                  rows: Optional[int] = None) -> "Head":
        """The head held by ``module`` (its ``weight`` [V, D] and ``bias``, as they are at this moment: inside
        the module's forward under FSDP2, the gathered ones), its first ``rows`` rows when given."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(f"the LM head {type(module).__name__} has no [vocab, hidden] weight")
        bias = getattr(module, "bias", None)
        if rows is not None:
            weight = weight[:rows]
            bias = None if bias is None else bias[:rows]
        return cls(weight, bias, scale, softcap)

    def fold(self, hidden: Tensor):
        """(hidden, bias) with the logit scale folded in: the model's logits are then
        ``softcap * tanh((hidden @ weight.T + bias) / softcap)``."""
        if self.scale == 1.0:
            return hidden, self.bias
        return hidden * self.scale, None if self.bias is None else self.bias * self.scale

    def capped(self, raw: Tensor) -> Tensor:
        """The logits from the raw products ``W h + b`` (of this head's rows): scale, then softcap."""
        logits = raw if self.scale == 1.0 else raw * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def logits(self, hidden: Tensor) -> Tensor:
        """The model's logits from its base model's final hidden states (scale and softcap applied)."""
        return self.capped(torch.nn.functional.linear(hidden, self.weight, self.bias))
