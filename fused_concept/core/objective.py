"""Row weights that turn `concept_loss(reduction="sum")` into the paper's objective.

    alpha_i = 1/N_v           on valid rows that are not content rows
    alpha_i = (1 - lam)/N_v   on content rows (valid rows whose concepts list at least one id)
    beta_i  = lam/|T|         on content rows, 0 elsewhere
"""
from __future__ import annotations

import torch
from torch import Tensor

from fused_concept.core.inputs import content_rows


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
    alpha = torch.where(content, (1.0 - lam) / n_valid, 1.0 / n_valid) * valid.float()
    beta = torch.where(content, lam / n_content, torch.zeros_like(alpha))
    return alpha.float(), beta.float()


FIXED_BY_OBJECTIVE = ("ntp_weight", "concept_weight", "reduction", "include_target", "mode")


def objective_loss_options(caller: str, loss_name: str, targets: Tensor, concepts, *, lam: float, margin,
                           ignore_index: int, num_valid, num_content, options: dict) -> dict:
    """Check the objective's arguments and return the keyword options that make `loss_name`
    (concept_loss or its vocab-parallel twin) compute the paper's objective."""
    for key in FIXED_BY_OBJECTIVE:
        if key in options:
            raise TypeError(f"{caller} fixes {key}; call {loss_name} to set it")
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if concepts is None:
        raise ValueError(f"{caller} needs concepts; use {loss_name} for plain cross-entropy")
    ntp_w, concept_w = paper_weights(targets, concepts, lam, ignore_index, num_valid=num_valid,
                                     num_content=num_content)
    return dict(options, ntp_weight=ntp_w.reshape(targets.shape), concept_weight=concept_w.reshape(targets.shape),
                margin=margin, ignore_index=ignore_index, reduction="sum", include_target=True)
