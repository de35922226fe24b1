"""Held-out evaluation from the fused per-row statistics (no logits are ever formed), and the `eval` command.

For every predicted position (row) i the fused loss returns ``lse_i``, ``ce_i``, ``mass_i`` and
``argmax_i`` (see the contract, "Statistics that must be returnable without logits"). Each batch adds
its rows to the additive sums of the metrics registry (``metrics.py``, which defines every metric), so
the result does not depend on how the held-out part is split over batches and ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Dict, Optional

import torch

from fused_concept import content_rows
from fused_concept.training import metrics as registry
from fused_concept.training.metrics import SUM_FIELDS, SUMS, Rows, metrics_from_sums

__all__ = ["evaluate", "evaluate_heldout", "evaluate_run", "eval_config", "metric_sums", "metrics_from_sums",
           "SUM_FIELDS"]


def metric_sums(stats, targets: torch.Tensor, concepts: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The additive sums (float64, order ``SUM_FIELDS``) of one batch of rows.

    ``stats`` has per-row ``ce``, ``mass`` and ``argmax`` shaped like ``targets``; ``concepts`` is
    ``targets.shape + (K,)`` with ``-1`` pads.
    """
    targets = targets.reshape(-1)
    concepts = concepts.reshape(targets.shape[0], -1)
    argmax = stats.argmax.reshape(-1).to(targets.device)
    valid = targets != ignore_index
    token_hit = valid & (argmax == targets)
    listed = (concepts == argmax[:, None]) & (concepts != -1)
    rows = Rows(valid=valid, content=content_rows(targets, concepts, ignore_index), ce=stats.ce.reshape(-1).double(),
                mass=stats.mass.reshape(-1).double(), token_hit=token_hit, concept_hit=token_hit | listed.any(dim=1))
    return torch.stack([add(rows).double() for add in SUMS.values()]).cpu()


def _append_rows(rows: Dict[str, list], stats, targets: torch.Tensor, concepts: torch.Tensor,
                 ignore_index: int = -100) -> None:
    """Per-row gold NLL, content flags, gold token ids and concept-set sizes (ids listed, gold included) of
    the valid rows, in order (for paired bootstrap intervals and the sweep's per-word view)."""
    targets = targets.reshape(-1)
    valid = targets != ignore_index
    concepts = concepts.reshape(valid.shape[0], -1)
    content = content_rows(targets, concepts, ignore_index)
    rows.setdefault("nll", []).extend(stats.ce.reshape(-1)[valid].double().tolist())
    rows.setdefault("content", []).extend(content[valid].tolist())
    rows.setdefault("target", []).extend(targets[valid].tolist())
    rows.setdefault("set_size", []).extend((concepts[valid] != -1).sum(dim=1).tolist())


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, concepts: torch.Tensor, *, batch_size: int = 16, impl: str = "auto",
             device: Optional[torch.device] = None, autocast_dtype: Optional[torch.dtype] = None, rank: int = 0,
             world_size: int = 1, group=None, rows: Optional[Dict[str, list]] = None) -> Dict[str, float]:
    """Held-out metrics (the registry's names) of a causal LM on sequences ``ids`` [B, T] with token-aligned
    ``concepts`` [B, T, K]. Row (b, t) predicts ``ids[b, t + 1]`` with concept set ``concepts[b, t + 1]``.
    Under ``torch.distributed`` (``world_size`` > 1) each rank evaluates every ``world_size``-th sequence
    and the sums are all-reduced, so every rank returns the same metrics. When ``rows`` is a dict (one
    process only), it receives the per-row gold NLL (``"nll"``) and content flag (``"content"``) of the
    valid rows, in sequence order, for paired bootstrap intervals, and their gold ids (``"target"``) and
    concept-set sizes (``"set_size"``)."""
    from fused_concept import concept_loss
    from fused_concept.integrations.hf import hidden_and_head

    device = device or ids.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device="cpu")  # host: added up from .cpu() sums
    mine = torch.arange(rank, ids.shape[0], world_size, device="cpu")  # indexes the host copy of ids
    for start in range(0, mine.numel(), batch_size):
        index = mine[start : start + batch_size]
        batch, batch_concepts = ids[index].to(device), concepts[index, 1:].to(device)
        targets = batch[:, 1:]
        with _autocast(device, autocast_dtype):
            hidden, weight, bias, softcap = hidden_and_head(model, batch[:, :-1], use_cache=False)
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        _, stats = concept_loss(hidden, weight, targets, batch_concepts, bias=bias, softcap=softcap,
                                reduction="sum", impl=impl, return_stats=True)
        sums += metric_sums(stats, targets, batch_concepts)
        if rows is not None:
            _append_rows(rows, stats, targets, batch_concepts)
    if world_size > 1:
        import torch.distributed as dist

        reduced = sums.to(device)
        dist.all_reduce(reduced, group=group)
        sums = reduced.cpu()
    model.train(was_training)
    return metrics_from_sums(sums)


def evaluate_heldout(config, run, model, tokenizer, data, rows: Optional[Dict] = None) -> Dict:
    """Held-out metrics of the current weights on the run's device and, with a tokenizer and
    `config.word_similarity`, Spearman rho on SimLex-999 and WordSim-353 (`word_similarity.py`)."""
    metrics = evaluate(model, data.heldout_ids, data.heldout_concepts, batch_size=config.eval_batch_size,
                       impl=config.impl, device=run.device, autocast_dtype=run.autocast_dtype, rank=run.rank,
                       world_size=run.world, rows=rows if run.world == 1 else None)
    if config.word_similarity and tokenizer is not None:
        from fused_concept.training.word_similarity import word_similarity

        filled = word_similarity(model, tokenizer)
        if tuple(filled) != registry.computed_by("word_similarity"):
            raise RuntimeError(f"word similarity filled {sorted(filled)}, the registry (metrics.py) names "
                               f"{sorted(registry.computed_by('word_similarity'))}")
        metrics.update(filled)
    return metrics


def eval_config(config, adapters: Optional[str] = None):
    """The config the `eval` command runs, refused up front with `ConfigError`: --adapters must be a run's
    adapters/ folder; without --model the base model is the one they record (`run.with_adapters_base_model`);
    every option `eval` shows follows its rule."""
    from fused_concept.training.config import EVAL, validate
    from fused_concept.training.run import with_adapters_base_model

    config = with_adapters_base_model(config, adapters)
    validate(config, EVAL)
    return config


def evaluate_run(config, *, adapters: Optional[str] = None) -> Dict:
    """`python -m fused_concept eval`: the held-out metrics and word similarity of the model `config`
    names (with --adapters and no --model: the base model the adapters record), with the PEFT adapters
    saved by a run (`RUN/adapters`) when `adapters` is given, on the held-out part `config`'s data options
    define (its concept sets from the shared cache, built from the base model as in training). Writes
    `config.out_dir`/metrics.json and heldout_rows.json."""
    from fused_concept.training import run as setup
    from fused_concept.training.config import EVAL, fields_of
    from fused_concept.training.data import TokenData, load_text
    from fused_concept.training.report import content_words_method, model_description, print_metrics, write_json

    t_start = time.time()
    config = eval_config(config, adapters)
    recorded = setup.recorded_base_model(adapters) if adapters is not None else None
    if recorded is not None and not setup.same_model(recorded, config.model):
        setup.log(f"note: the adapters record base model {recorded}; evaluating them on --model "
                  f"{setup.model_reference(config.model)}")
    run, finished = setup.start_run(config), False
    try:
        text = load_text(config.data)
        model, tokenizer = setup.setup_model(config, run, None, None)
        heldout_ids = setup.heldout_part(config, text, tokenizer)
        data = TokenData(heldout_ids[:0], None, heldout_ids,
                         setup.concept_sets(config, run, model, tokenizer, "heldout", heldout_ids))
        if adapters is not None:
            model = setup.load_adapters(model, adapters).to(run.device)
        rows = {}
        metrics = evaluate_heldout(config, run, model, tokenizer, data, rows)
        used = {item.name: getattr(config, item.name) for item in fields_of(EVAL)}
        result = {"model": model_description(config), "adapters": adapters,
                  "content_words": content_words_method(config, text), "config": used, "metrics": metrics,
                  "seconds": round(time.time() - t_start, 2)}
        if run.rank == 0:
            os.makedirs(config.out_dir, exist_ok=True)
            write_json(os.path.join(config.out_dir, "metrics.json"), result)
            write_json(os.path.join(config.out_dir, "heldout_rows.json"), {"eval": rows})
            print_metrics(metrics)
        finished = True
        return result
    finally:
        setup.end_run(run, finished)
