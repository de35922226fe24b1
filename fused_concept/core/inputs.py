"""Validation and canonical form of the loss inputs (step 0 of docs/internals.md).

Every implementation receives the same `Canonical` bundle, so the rules of the contract (ignored
rows, duplicates counted once, the gold id joining the set, rows that list no id) are applied once,
here, and kernels only ever see a deduplicated id matrix with -1 pads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
from torch import Tensor

from fused_concept.core.options import LossOptions, RowWeight

PAD = -1


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
    ntp_weight: Tensor  # [N] float32, the token term's weight per row
    concept_weight: Tensor  # [N] float32, the concept term's weight per row
    lead_shape: torch.Size  # the rows' shape as the user passed them (before a shift)
    softcap: Optional[float] = None
    margin: Optional[float] = None
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    vocab_start: int = 0  # global id of weight's first row
    vocab_size: int = 0  # the global V (label smoothing spreads eps over all of it)
    shifted: bool = False  # rows were shifted: the last row of every sequence is dropped from the outputs

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
                       soft_weights=cut(self.soft_weights), ntp_weight=self.ntp_weight[lo:hi],
                       concept_weight=self.concept_weight[lo:hi], lead_shape=torch.Size([hi - lo]), shifted=False)

    def with_head(self, weight: Tensor, bias: Optional[Tensor]) -> "Canonical":
        """The same rows and options against another head (autograd hands the Function its own views)."""
        return replace(self, weight=weight, bias=bias)


def content_rows(targets: Tensor, concepts: Tensor, ignore_index: int = -100) -> Tensor:
    """The content rows T of docs/math.md ("The paper's objective"): rows whose target counts (is not
    `ignore_index`) and whose concept row lists at least one id. Bool, shaped like `targets`; `concepts` is
    `targets.shape + (K,)`, -1 padded. `content_rows(...).sum()` is the |T| that `num_content=` takes."""
    return (targets != ignore_index) & (concepts != PAD).any(dim=-1)


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


def _row_weight(name: str, w: RowWeight, lead_shape: torch.Size, device, shift: bool) -> Tensor:
    """A row weight as an [N] float32 tensor (a tensor shaped like targets moves with the targets' shift)."""
    n = math.prod(lead_shape)
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
        w = w.detach().reshape(lead_shape)
        return (_shifted(w, 0.0, len(lead_shape) - 1) if shift else w).reshape(n).float()
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


def prepare(hidden: Tensor, weight: Tensor, targets: Tensor, concepts: Optional[Tensor] = None, *,
            bias: Optional[Tensor] = None, concept_probs: Optional[Tensor] = None,
            options: LossOptions = LossOptions(), vocab_size: Optional[int] = None, vocab_start: int = 0) -> Canonical:
    """Validate the user's inputs (raising TypeError / ValueError that name the culprit) and return the
    canonical bundle. For a vocabulary shard, `vocab_size` is the global V the ids are checked against and
    `vocab_start` the global id of the shard's first row; the shard may then hold no rows."""
    vocab = _check_head(hidden, weight, bias, vocab_size, vocab_start)
    _check_devices(hidden.device, weight=weight, bias=bias, targets=targets, concepts=concepts,
                   concept_probs=concept_probs)
    lead_shape = hidden.shape[:-1]
    n = math.prod(lead_shape)
    flat_targets, flat_concepts = _flat_ids(targets, concepts, concept_probs, lead_shape, options)
    valid = checked_valid_rows(flat_targets, flat_concepts, options.ignore_index, vocab)
    has_set = valid & (flat_concepts != PAD).any(dim=1)
    canon_targets = flat_targets.masked_fill(~valid, PAD)
    members = flat_concepts.masked_fill(~has_set[:, None], PAD)
    soft_ids, soft_weights = _soft_inputs(members, concepts, concept_probs, options)
    return Canonical(
        hidden=hidden.reshape(n, hidden.shape[-1]), weight=weight, bias=bias, targets=canon_targets.contiguous(),
        valid=valid, set_ids=_concept_sets(members, canon_targets, has_set, options.include_target), has_set=has_set,
        soft_ids=soft_ids, soft_weights=soft_weights,
        ntp_weight=_row_weight("ntp_weight", options.ntp_weight, lead_shape, hidden.device, options.shift),
        concept_weight=_row_weight("concept_weight", options.concept_weight, lead_shape, hidden.device, options.shift),
        lead_shape=lead_shape, softcap=None if options.softcap is None else float(options.softcap),
        margin=None if options.margin is None else float(options.margin), z_loss=float(options.z_loss),
        label_smoothing=float(options.label_smoothing), vocab_start=int(vocab_start), vocab_size=vocab,
        shifted=options.shift)


def _check_head(hidden, weight, bias, vocab_size: Optional[int], vocab_start: int) -> int:
    """Types, ranks and sizes of hidden / weight / bias; returns the global vocabulary size V."""
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
    return vocab


def _check_devices(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.device != device:
            raise ValueError(f"{name} must be on hidden's device {device}, got a tensor on {t.device}")


def _shifted(t: Tensor, fill, seq_dim: int) -> Tensor:
    """`t` moved one step left along `seq_dim` (position s takes s + 1), `fill` at the end: a copy of the
    small per-row tensors (ids, weights) so that the hidden states need none."""
    tail = torch.full_like(t.narrow(seq_dim, 0, min(1, t.shape[seq_dim])), fill)
    return torch.cat([t.narrow(seq_dim, 1, max(0, t.shape[seq_dim] - 1)), tail], dim=seq_dim)


def _flat_ids(targets, concepts, concept_probs, lead_shape, options: LossOptions) -> Tuple[Tensor, Tensor]:
    """(targets [N] int64, concepts [N, K] int64) after the shape checks (and the shift when asked)."""
    _check_int_tensor("targets", targets)
    if targets.shape != lead_shape:
        raise ValueError(f"targets must have hidden's leading shape {tuple(lead_shape)}, got {tuple(targets.shape)}")
    n = math.prod(lead_shape)
    if concepts is None:
        if concept_probs is not None:
            raise ValueError("concept_probs weights the ids in concepts, so it needs concepts, got concepts=None")
        concepts = torch.full((*lead_shape, 0), PAD, dtype=torch.long, device=targets.device)
    _check_int_tensor("concepts", concepts)
    if concepts.dim() != len(lead_shape) + 1 or concepts.shape[:-1] != lead_shape:
        raise ValueError(f"concepts must be shaped {tuple(lead_shape)} + (K,), got {tuple(concepts.shape)}")
    if options.shift:
        seq = len(lead_shape) - 1
        targets, concepts = _shifted(targets, options.ignore_index, seq), _shifted(concepts, PAD, seq)
    return targets.reshape(n).long(), concepts.reshape(n, concepts.shape[-1]).long()


def _concept_sets(members: Tensor, targets: Tensor, has_set: Tensor, include_target: bool) -> Tensor:
    """[N, S] deduplicated set ids (the gold id appended when `include_target`), -1 pads; rows without a set
    are all -1."""
    if include_target and members.shape[1] > 0:
        members = torch.cat([members, targets.masked_fill(~has_set, PAD)[:, None]], dim=1)
    return dedup_rows(members).contiguous()


def _soft_inputs(members: Tensor, concepts, concept_probs, options: LossOptions):
    """(soft_ids [N, K], soft_weights [N, K] float32) in soft mode, else (None, None)."""
    if options.mode != "soft":
        if concept_probs is not None:
            raise ValueError(f'concept_probs is only used with mode="soft", got mode={options.mode!r}')
        return None, None
    if concepts is None or concept_probs is None:
        missing = " and ".join(f"{name}=None" for name, t in (("concepts", concepts),
                                                               ("concept_probs", concept_probs)) if t is None)
        raise ValueError(f'mode="soft" needs both concepts and concept_probs, got {missing}')
    _check_float_tensor("concept_probs", concept_probs)
    if concept_probs.shape != concepts.shape:
        raise ValueError(f"concept_probs must have the shape of concepts {tuple(concepts.shape)}, "
                         f"got {tuple(concept_probs.shape)}")
    probs = concept_probs.detach()
    if options.shift:
        probs = _shifted(probs, 0.0, probs.dim() - 2)
    soft_ids = members.contiguous()
    soft_weights = probs.reshape(soft_ids.shape).float()  # explicit K: N may be 0
    return soft_ids, soft_weights.masked_fill(soft_ids == PAD, 0.0).contiguous()
