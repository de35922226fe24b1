"""Held-out evaluation from the fused per-row statistics (no logits are ever formed).

For every predicted position (row) i the fused loss returns ``lse_i``, ``ce_i``, ``mass_i`` and
``argmax_i`` (see the contract, "Statistics that must be returnable without logits"). With valid rows
V (target not ``ignore_index``) and content rows T (valid rows whose concept row lists at least one id):

- global perplexity      ``exp( sum_{i in V} ce_i / |V| )``
- content perplexity     ``exp( sum_{i in T} ce_i / |T| )`` (the paper's eval_ntp_content_words.py: exp of the
                         mean gold NLL pooled over all content positions of all sequences)
- non-content perplexity ``exp( sum_{i in V - T} ce_i / |V - T| )`` (their ``--non-target`` complement)
- mean concept mass      ``sum_{i in T} mass_i / |T|``, mass_i = probability of the set S_i (gold included)
- concept accuracy       ``|{i in T : argmax_i in S_i}| / |T|``
- token accuracy         ``|{i in V : argmax_i = y_i}| / |V|``

Batches (and ranks) are combined by adding the seven sums below, so the result does not depend on
how the held-out part is split.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch

SUM_FIELDS = ("valid", "ce_valid", "content", "ce_content", "mass_content", "concept_hits", "token_hits")


def metric_sums(stats, targets: torch.Tensor, concepts: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The seven additive sums (float64 [7], order ``SUM_FIELDS``) of one batch of rows.

    ``stats`` has per-row ``ce``, ``mass`` and ``argmax`` shaped like ``targets``; ``concepts`` is
    ``targets.shape + (K,)`` with ``-1`` pads.
    """
    targets = targets.reshape(-1)
    concepts = concepts.reshape(targets.shape[0], -1)
    ce = stats.ce.reshape(-1).double()
    mass = stats.mass.reshape(-1).double()
    argmax = stats.argmax.reshape(-1).to(targets.device)
    valid = targets != ignore_index
    content = valid & (concepts != -1).any(dim=1)
    token_hit = valid & (argmax == targets)
    in_set = token_hit | ((concepts == argmax[:, None]) & (concepts != -1)).any(dim=1)
    return torch.stack(
        [
            valid.sum().double(),
            ce[valid].sum(),
            content.sum().double(),
            ce[content].sum(),
            mass[content].sum(),
            (in_set & content).sum().double(),
            token_hit.sum().double(),
        ]
    ).cpu()


def metrics_from_sums(sums: torch.Tensor) -> Dict[str, float]:
    """Perplexities, mean concept mass and accuracies from summed ``metric_sums`` (NaN where undefined)."""
    s = dict(zip(SUM_FIELDS, sums.tolist()))

    def ratio(num, den):
        return num / den if den > 0 else float("nan")

    return {
        "ppl": math.exp(ratio(s["ce_valid"], s["valid"])) if s["valid"] > 0 else float("nan"),
        "content_ppl": math.exp(ratio(s["ce_content"], s["content"])) if s["content"] > 0 else float("nan"),
        "noncontent_ppl": (math.exp(ratio(s["ce_valid"] - s["ce_content"], s["valid"] - s["content"]))
                           if s["valid"] > s["content"] else float("nan")),
        "concept_mass": ratio(s["mass_content"], s["content"]),
        "concept_acc": ratio(s["concept_hits"], s["content"]),
        "token_acc": ratio(s["token_hits"], s["valid"]),
        "valid_tokens": int(s["valid"]),
        "content_tokens": int(s["content"]),
    }


def _append_rows(rows: Dict[str, list], stats, targets: torch.Tensor, concepts: torch.Tensor,
                 ignore_index: int = -100) -> None:
    valid = targets.reshape(-1) != ignore_index
    content = (concepts.reshape(valid.shape[0], -1) != -1).any(dim=1)
    rows.setdefault("nll", []).extend(stats.ce.reshape(-1)[valid].double().tolist())
    rows.setdefault("content", []).extend(content[valid].tolist())


@torch.no_grad()
def evaluate(
    model,
    ids: torch.Tensor,
    concepts: torch.Tensor,
    *,
    batch_size: int = 16,
    impl: str = "auto",
    device: Optional[torch.device] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    rank: int = 0,
    world_size: int = 1,
    group=None,
    rows: Optional[Dict[str, list]] = None,
) -> Dict[str, float]:
    """Evaluate a causal LM on token sequences ``ids`` [B, T] with token-aligned ``concepts`` [B, T, K].

    Row (b, t) predicts ``ids[b, t + 1]`` with concept set ``concepts[b, t + 1]``. Under
    ``torch.distributed`` (``world_size`` > 1) each rank evaluates every ``world_size``-th sequence
    and the sums are all-reduced, so every rank returns the same metrics. When ``rows`` is a dict (one
    process only), it receives the per-row gold NLL (``"nll"``) and content flag (``"content"``) of the
    valid rows, in sequence order, for paired bootstrap intervals.
    """
    from fused_concept import concept_loss
    from fused_concept.integrations.hf import hidden_and_head

    device = device or ids.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64)
    mine = torch.arange(rank, ids.shape[0], world_size)
    for start in range(0, mine.numel(), batch_size):
        index = mine[start : start + batch_size]
        batch = ids[index].to(device)
        batch_concepts = concepts[index].to(device)
        targets = batch[:, 1:]
        cast = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with cast:
            hidden, weight, bias, softcap = hidden_and_head(model, batch[:, :-1], use_cache=False)
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        _, stats = concept_loss(
            hidden,
            weight,
            targets,
            batch_concepts[:, 1:],
            bias=bias,
            softcap=softcap,
            reduction="sum",
            impl=impl,
            return_stats=True,
        )
        sums += metric_sums(stats, targets, batch_concepts[:, 1:])
        if rows is not None:
            _append_rows(rows, stats, targets, batch_concepts[:, 1:])
    if world_size > 1:
        import torch.distributed as dist

        reduced = sums.to(device)
        dist.all_reduce(reduced, group=group)
        sums = reduced.cpu()
    model.train(was_training)
    return metrics_from_sums(sums)
