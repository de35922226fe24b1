"""transformers.Trainer for a model patched by `fused_concept.hf.patch`: a data collator that carries the
concept sets, and a Trainer that hands the paper objective the counts of the whole optimizer step.

The Trainer already counts the label tokens of all micro-batches of one optimizer step (gradient
accumulation, and all data-parallel ranks with ``average_tokens_across_devices``) and passes that count to
the model as ``num_items_in_batch``; the patched model then divides its token term by it, so the step's
gradient is that of one big batch. The concept term is a mean over the content rows |T|, which the Trainer
does not count: :class:`ConceptTrainer` counts them the same way and adds ``num_content`` to every
micro-batch. (With a plain ``transformers.Trainer`` the patched model estimates |T| from the micro-batch's
share of content rows: exact without gradient accumulation, approximate with it.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from transformers import Trainer

from fused_concept.core.inputs import PAD, content_rows


def _ragged(name: str, value, length: int, index: int, dtype, fill) -> Tensor:
    """[T, K] from a tensor / nested list [T, K], or a list of T lists of any lengths (padded with `fill`)."""
    if isinstance(value, Tensor) or (len(value) and not isinstance(value[0], (list, tuple))):
        rows = torch.as_tensor(value, dtype=dtype)
        if rows.dim() != 2:
            raise ValueError(f"{name} of example {index} must be [T, K] or a list of T lists, got shape "
                             f"{tuple(rows.shape)}")
    else:
        width = max((len(r) for r in value), default=0)
        rows = torch.full((len(value), width), fill, dtype=dtype)
        for t, r in enumerate(value):
            rows[t, : len(r)] = torch.as_tensor(r, dtype=dtype)
    if rows.shape[0] != length:
        raise ValueError(f"{name} of example {index} has {rows.shape[0]} rows but its input_ids has {length} tokens")
    return rows


@dataclass
class ConceptCollator:
    """Pads examples into a batch for a patched model (right padding).

    An example is a dict with ``input_ids`` [T] and optionally ``labels`` [T] (default: the input ids),
    ``concepts`` (the concept set of each token, aligned with ``input_ids`` as ``hf.patch`` expects: a [T, K]
    tensor with -1 pads or a list of T lists of ids) and ``concept_probs`` (the same layout, for the soft mode).
    The batch holds ``input_ids`` [B, T_max] (``pad_token_id``), ``attention_mask``, ``labels`` (``ignore_index``
    at padding), and, when any example has them, ``concepts`` [B, T_max, K_max] (-1 pads; an example without
    concepts has none) and ``concept_probs`` (0 at pads). ``max_concepts`` keeps the first ids of each set."""

    pad_token_id: int = 0
    ignore_index: int = -100
    max_concepts: Optional[int] = None

    def __call__(self, examples: list) -> dict:
        ids = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        batch, length = len(ids), max(len(t) for t in ids)
        out = dict(input_ids=torch.full((batch, length), self.pad_token_id, dtype=torch.long),
                   attention_mask=torch.zeros(batch, length, dtype=torch.long),
                   labels=torch.full((batch, length), self.ignore_index, dtype=torch.long))
        for i, (e, t) in enumerate(zip(examples, ids)):
            out["input_ids"][i, : len(t)] = t
            out["attention_mask"][i, : len(t)] = 1
            out["labels"][i, : len(t)] = torch.as_tensor(e.get("labels", t), dtype=torch.long)
        for name, dtype, fill in (("concepts", torch.long, PAD), ("concept_probs", torch.float32, 0.0)):
            if any(name in e for e in examples):
                out[name] = self._sets(name, examples, ids, length, dtype, fill)
        return out

    def _sets(self, name, examples, ids, length, dtype, fill) -> Tensor:
        rows = [None if name not in e else _ragged(name, e[name], len(t), i, dtype, fill)
                for i, (e, t) in enumerate(zip(examples, ids))]
        width = max(r.shape[1] for r in rows if r is not None)
        if self.max_concepts is not None:
            width = min(width, self.max_concepts)
        sets = torch.full((len(rows), length, width), fill, dtype=dtype)
        for i, r in enumerate(rows):
            if r is not None:
                sets[i, : r.shape[0], : min(width, r.shape[1])] = r[:, :width]
        return sets


def batch_content_rows(batch: dict, ignore_index: int = -100) -> Tensor:
    """The number of content rows of a collated batch as the patched model counts them: shifted labels that count and whose
    concept row lists an id (``shift_labels``, when present, are taken as already shifted, with ``concepts``)."""
    if "shift_labels" in batch:
        labels, concepts = batch["shift_labels"], batch["concepts"]
    else:
        labels, concepts = batch["labels"][:, 1:], batch["concepts"][:, 1:]
    return content_rows(labels, concepts, ignore_index).sum()


class ConceptTrainer(Trainer):
    """``transformers.Trainer`` that gives every micro-batch ``num_content``: the content rows of all
    micro-batches of the optimizer step (and of all ranks, with ``average_tokens_across_devices``), counted as
    the Trainer counts ``num_items_in_batch``. The patched model's objective then equals the paper's objective
    on the whole step's batch, with or without gradient accumulation. Patch the model before building it."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is not None and batches and all("concepts" in b for b in batches):
            count = sum(batch_content_rows(b) for b in batches).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            for b in batches:
                b["num_content"] = count
        return batches, num_items
