"""Validation and canonical form of the loss inputs (step 0 of docs/internals.md).

Every implementation receives the same `Canonical` bundle, so the rules of the contract (ignored
rows, duplicates counted once, the gold id joining the set, rows that list no id) are applied once,
here, and kernels only ever see a deduplicated id matrix with -1 pads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import Tensor

MODES = ("marginal", "soft")
REDUCTIONS = ("mean", "sum", "none")
PAD = -1

RowWeight = Union[float, int, Tensor]


@dataclass(frozen=True)
class Canonical:
    """Everything an implementation needs, validated: the rows, this device's block of the head and
    the options of the row math. `weight` is the whole head, or one vocabulary shard whose first row
    is global id `vocab_start` (vocab-parallel; the shard may hold no rows)."""

    hidden: Tensor  # [N, D]
    weight: Tensor  # [V_shard, D]
    bias: Optional[Tensor]  # [V_shard]
    targets: Tensor  # [N] int64, -1 on ignored rows
    valid: Tensor  # [N] bool
    set_ids: Tensor  # [N, S] int64, deduplicated concept set (gold included when asked), -1 pads
    has_set: Tensor  # [N] bool: valid row whose concepts list at least one id
    soft_ids: Optional[Tensor]  # [N, K] int64 (soft mode), -1 pads
    soft_weights: Optional[Tensor]  # [N, K] float32 (soft mode), 0 at pads
    alpha: Tensor  # [N] float32
    beta: Tensor  # [N] float32
    lead_shape: torch.Size
    softcap: Optional[float] = None
    margin: Optional[float] = None
    z_loss: float = 0.0
    vocab_start: int = 0  # global id of weight's first row

    @property
    def soft(self) -> bool:
        return self.soft_ids is not None

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    def rows(self, lo: int, hi: int) -> "Canonical":
        """The same bundle restricted to rows lo..hi-1 (views, no copies; the head is shared)."""
        cut = lambda t: None if t is None else t[lo:hi]  # noqa: E731
        return replace(self, hidden=self.hidden[lo:hi], targets=self.targets[lo:hi], valid=self.valid[lo:hi],
                       set_ids=self.set_ids[lo:hi], has_set=self.has_set[lo:hi], soft_ids=cut(self.soft_ids),
                       soft_weights=cut(self.soft_weights), alpha=self.alpha[lo:hi], beta=self.beta[lo:hi],
                       lead_shape=torch.Size([hi - lo]))

    def with_head(self, weight: Tensor, bias: Optional[Tensor]) -> "Canonical":
        """The same rows and options against another head (autograd hands the Function its own views)."""
        return replace(self, weight=weight, bias=bias)


def content_rows(targets: Tensor, concepts: Tensor, ignore_index: int = -100) -> Tensor:
    """The content rows T of docs/math.md ("The paper's objective"): rows whose target counts (is not
    `ignore_index`) and whose concept row lists at least one id. Bool, shaped like `targets`; `concepts` is
    `targets.shape + (K,)`, -1 padded. `content_rows(...).sum()` is the |T| that `num_content=` takes."""
    return (targets != ignore_index) & (concepts != PAD).any(dim=-1)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_float_tensor(name: str, t, allow_none: bool = False) -> None:
    if t is None and allow_none:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_int_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer token ids, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got a tensor of dtype {t.dtype}")


def _row_weight(name: str, w: RowWeight, lead_shape: torch.Size, n: int, device) -> Tensor:
    if isinstance(w, Tensor):
        if w.is_complex() or w.dtype == torch.bool:
            raise TypeError(f"{name} must be a float or a real tensor, got a tensor of dtype {w.dtype}")
        if w.dim() == 0:
            return w.detach().float().to(device).expand(n).contiguous()
        if w.shape != lead_shape and w.shape != (n,):
            raise ValueError(
                f"{name} must be a float or a tensor shaped like targets {tuple(lead_shape)}, "
                f"got shape {tuple(w.shape)}"
            )
        if w.device != device:
            raise ValueError(f"{name} must be on hidden's device {device}, got a tensor on {w.device}")
        return w.detach().reshape(n).float()
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(w).__name__} {w!r}")
    return torch.full((n,), float(w), dtype=torch.float32, device=device)


def _first_bad(ids: Tensor, bad: Tensor) -> int:
    return int(ids[bad].reshape(-1)[0].item())


@torch.library.custom_op("fused_concept::checked_valid_rows", mutates_args=())
def checked_valid_rows(flat_targets: Tensor, flat_concepts: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """The rows that count (`targets != ignore_index`), after checking that every id lies in [0, vocab).

    These are the only checks that read tensor values. They run inside a registered op so that
    torch.compile(fullgraph=True) keeps them out of the traced graph (the fake below gives the shape):
    they still run, and raise, at run time in compiled code as in eager code."""
    valid = flat_targets != ignore_index
    bad = valid & ((flat_targets < 0) | (flat_targets >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"targets holds id {_first_bad(flat_targets, bad)} outside the vocabulary [0, {vocab}) "
            f"(use ignore_index={ignore_index} to drop a row)"
        )
    bad = (flat_concepts != PAD) & ((flat_concepts < 0) | (flat_concepts >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"concepts holds id {_first_bad(flat_concepts, bad)} outside the vocabulary [0, {vocab}) "
            f"(pad with -1)"
        )
    return valid


@checked_valid_rows.register_fake
def _(flat_targets, flat_concepts, ignore_index, vocab):
    return torch.empty_like(flat_targets, dtype=torch.bool)


def dedup_rows(ids: Tensor) -> Tensor:
    """Replace repeated ids within each row by -1 (each id kept once; order not preserved)."""
    if ids.shape[1] <= 1:
        return ids
    ordered = ids.sort(dim=1, descending=True).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return ordered.masked_fill(repeat, PAD)


def prepare(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    concepts: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    ntp_weight: RowWeight = 1.0,
    concept_weight: RowWeight = 1.0,
    margin: Optional[float] = None,
    mode: str = "marginal",
    concept_probs: Optional[Tensor] = None,
    include_target: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    vocab_size: Optional[int] = None,
    vocab_start: int = 0,
) -> Canonical:
    """Validate the user's inputs (raising TypeError / ValueError that name the culprit) and return
    the canonical bundle. For a vocabulary shard, `vocab_size` is the global V the ids are checked
    against and `vocab_start` the global id of the shard's first row; the shard may then hold no rows."""
    _check_float_tensor("hidden", hidden)
    _check_float_tensor("weight", weight)
    _check_float_tensor("bias", bias, allow_none=True)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"weight must have the same dtype as hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias must have the same dtype as weight ({weight.dtype}), got {bias.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., D] with at least one leading dim, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    d = hidden.shape[-1]
    if weight.shape[1] != d:
        raise ValueError(f"weight must be [V, {d}] to match hidden's last dim, got shape {tuple(weight.shape)}")
    v_local = weight.shape[0]
    vocab = v_local if vocab_size is None else int(vocab_size)
    if vocab < 1:
        raise ValueError(f"weight must hold at least one vocabulary row, got shape {tuple(weight.shape)}")
    if not 0 <= vocab_start <= vocab - v_local:
        raise ValueError(f"a shard of {v_local} rows cannot start at id {vocab_start} of a vocabulary of {vocab}")
    if bias is not None and tuple(bias.shape) != (v_local,):
        raise ValueError(f"bias must be [{v_local}] to match weight, got shape {tuple(bias.shape)}")
    device = hidden.device
    for name, t in (("weight", weight), ("bias", bias), ("targets", targets), ("concepts", concepts),
                    ("concept_probs", concept_probs)):
        if isinstance(t, Tensor) and t.device != device:
            raise ValueError(f"{name} must be on hidden's device {device}, got a tensor on {t.device}")

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise TypeError(f"margin must be None or a float, got {type(margin).__name__} {margin!r}")
    if margin is not None and math.isnan(margin):
        raise ValueError(f"margin must be None or a number (no row's mass is below NaN), got {margin!r}")
    if softcap is not None and not (_is_number(softcap) and 0 < softcap < math.inf):
        raise ValueError(f"softcap must be None or a positive finite float, got {softcap!r}")
    if not (_is_number(z_loss) and 0 <= z_loss < math.inf):
        raise ValueError(f"z_loss must be a non-negative finite float, got {z_loss!r}")
    if not isinstance(include_target, bool):
        raise TypeError(f"include_target must be True or False, got {type(include_target).__name__} "
                        f"{include_target!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")

    lead_shape = hidden.shape[:-1]
    n = 1
    for s in lead_shape:
        n *= s

    _check_int_tensor("targets", targets)
    if targets.shape != lead_shape:
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(lead_shape)}, got {tuple(targets.shape)}"
        )
    flat_targets = targets.reshape(n).long()

    if concepts is None:
        if concept_probs is not None:
            raise ValueError("concept_probs weights the ids in concepts, so it needs concepts, got concepts=None")
        flat_concepts = torch.full((n, 0), PAD, dtype=torch.long, device=device)
    else:
        _check_int_tensor("concepts", concepts)
        if concepts.dim() != len(lead_shape) + 1 or concepts.shape[:-1] != lead_shape:
            raise ValueError(
                f"concepts must be shaped {tuple(lead_shape)} + (K,), got {tuple(concepts.shape)}"
            )
        flat_concepts = concepts.reshape(n, concepts.shape[-1]).long()
    valid = checked_valid_rows(flat_targets, flat_concepts, ignore_index, vocab)

    listed = flat_concepts != PAD
    has_set = valid & listed.any(dim=1)
    canon_targets = flat_targets.masked_fill(~valid, PAD)

    members = flat_concepts.masked_fill(~has_set[:, None], PAD)
    if include_target and members.shape[1] > 0:
        gold = canon_targets.masked_fill(~has_set, PAD)[:, None]
        members = torch.cat([members, gold], dim=1)
    set_ids = dedup_rows(members).contiguous()

    soft_ids = soft_weights = None
    if mode == "soft":
        if concepts is None or concept_probs is None:
            missing = " and ".join(f"{name}=None" for name, t in (("concepts", concepts),
                                                                   ("concept_probs", concept_probs)) if t is None)
            raise ValueError(f'mode="soft" needs both concepts and concept_probs, got {missing}')
        _check_float_tensor("concept_probs", concept_probs)
        if concept_probs.shape != concepts.shape:
            raise ValueError(
                f"concept_probs must have the shape of concepts {tuple(concepts.shape)}, "
                f"got {tuple(concept_probs.shape)}"
            )
        soft_ids = members[:, : flat_concepts.shape[1]].contiguous()
        flat_probs = concept_probs.detach().reshape(soft_ids.shape).float()  # explicit K: N may be 0
        soft_weights = flat_probs.masked_fill(soft_ids == PAD, 0.0).contiguous()
    elif concept_probs is not None:
        raise ValueError(f'concept_probs is only used with mode="soft", got mode={mode!r}')

    return Canonical(
        hidden=hidden.reshape(n, d),
        weight=weight,
        bias=bias,
        targets=canon_targets.contiguous(),
        valid=valid,
        set_ids=set_ids,
        has_set=has_set,
        soft_ids=soft_ids,
        soft_weights=soft_weights,
        alpha=_row_weight("ntp_weight", ntp_weight, lead_shape, n, device),
        beta=_row_weight("concept_weight", concept_weight, lead_shape, n, device),
        lead_shape=lead_shape,
        softcap=None if softcap is None else float(softcap),
        margin=None if margin is None else float(margin),
        z_loss=float(z_loss),
        vocab_start=int(vocab_start),
    )
