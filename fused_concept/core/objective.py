"""Row weights that turn `concept_loss(reduction="sum")` into the paper's objective.

    ntp_weight_i     = 1/N_v           on valid rows that are not content rows
    ntp_weight_i     = (1 - lam)/N_v   on content rows (valid rows whose concepts list at least one id)
    concept_weight_i = lam/|T|         on content rows, 0 elsewhere
"""
from __future__ import annotations

import torch
from torch import Tensor

from fused_concept.core.inputs import content_rows
from fused_concept.core.options import LossOptions


def paper_weights(targets: Tensor, concepts: Tensor, lam: float, ignore_index: int = -100, *,
                  num_valid=None, num_content=None) -> tuple[Tensor, Tensor]:
    """(ntp_weight, concept_weight), flattened [N] float32. `num_valid`/`num_content` override the
    counts N_v and |T| (ints or 0-dim tensors; e.g. summed over micro-batches and ranks)."""
    flat_t = targets.reshape(-1)
    valid = flat_t != ignore_index
    if concepts.dim() < 1 or concepts.shape[:-1] != targets.shape:
        raise ValueError(f"concepts must be shaped {tuple(targets.shape)} + (K,), got {tuple(concepts.shape)}")
    content = content_rows(flat_t, concepts.reshape(flat_t.shape[0], -1), ignore_index)
    n_valid = valid.sum() if num_valid is None else torch.as_tensor(num_valid, device=targets.device)
    n_content = content.sum() if num_content is None else torch.as_tensor(num_content, device=targets.device)
    n_valid = n_valid.float().clamp(min=1)
    n_content = n_content.float().clamp(min=1)
    lam = float(lam)
    ntp = torch.where(content, (1.0 - lam) / n_valid, 1.0 / n_valid) * valid.float()
    concept = torch.where(content, lam / n_content, torch.zeros_like(ntp))
    return ntp.float(), concept.float()


FIXED_BY_OBJECTIVE = ("ntp_weight", "concept_weight", "reduction", "include_target", "mode")


def _aligned_weights(targets: Tensor, concepts: Tensor, lam: float, ignore_index: int, shift: bool, **counts):
    """The paper's weights shaped like `targets`. With `shift`, row t predicts targets[..., t + 1]: the weights
    are those of the shifted rows, placed at the targets they belong to (prepare moves them with the targets)."""
    if not shift:
        ntp, concept = paper_weights(targets, concepts, lam, ignore_index, **counts)
        return ntp.reshape(targets.shape), concept.reshape(targets.shape)
    ntp, concept = paper_weights(targets[..., 1:], concepts[..., 1:, :], lam, ignore_index, **counts)
    full = [torch.zeros(targets.shape, dtype=torch.float32, device=targets.device) for _ in range(2)]
    for out, w in zip(full, (ntp, concept)):
        out[..., 1:] = w.reshape(targets[..., 1:].shape)
    return tuple(full)


def paper_options(targets: Tensor, concepts: Tensor, *, lam: float, margin, ignore_index: int = -100,
                  num_valid=None, num_content=None, **loss_keywords) -> LossOptions:
    """The `LossOptions` whose reduction="sum" loss is the paper's objective: its per-row weights (module
    docstring), the gold id in every set unless `include_target=False` is among `loss_keywords` (the other
    loss options, e.g. mode, softcap, z_loss, label_smoothing, shift)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be a float in [0, 1], got {lam!r}")
    ntp, concept = _aligned_weights(targets, concepts, lam, ignore_index, bool(loss_keywords.get("shift", False)),
                                    num_valid=num_valid, num_content=num_content)
    return LossOptions(**{"include_target": True, **loss_keywords}, ntp_weight=ntp, concept_weight=concept,
                       margin=margin, ignore_index=ignore_index, reduction="sum")


def objective_options(caller: str, loss_name: str, targets: Tensor, concepts, *, options: dict,
                      **objective) -> LossOptions:
    """`paper_options` for the public objectives (concept_objective and its vocab-parallel twin), which fix
    the paper's set rule: `options` (further loss keywords) may not set what FIXED_BY_OBJECTIVE names."""
    for key in FIXED_BY_OBJECTIVE:
        if key in options:
            raise TypeError(f"{caller} fixes {key}; call {loss_name} to set it")
    if concepts is None:
        raise ValueError(f"{caller} needs concepts; use {loss_name} for plain cross-entropy")
    return paper_options(targets, concepts, **objective, **options)
