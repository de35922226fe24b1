"""Self-supervised concept sets: synonyms of each content word, found by the model itself.

The recipe is the paper's embedding method (Zhang, Jurafsky, Shani 2026, "Learning Concepts, Not Tokens";
released code: data/get_content_words.py, data/embedding_synonyms.py). For a content word ``x_t`` of a
sequence ``x`` (content words: :func:`content_word_mask`, spaCy NOUN / VERB / ADJ):

1. candidates are the ``top_k`` (100) most likely next tokens predicted at position ``t-1`` that are a
   space followed by ASCII letters or digits, and not the gold word in any casing;
2. each candidate ``c`` is substituted at ``t``; the base model's last hidden state at ``t`` for
   ``x_0 .. x_{t-1} c`` is compared with the original one by cosine similarity;
3. the candidates with cosine ``>= threshold`` (0.75), best first, at most ``max_synonyms`` (10), are
   POS-checked: a candidate stays only when spaCy gives it, substituted into the sentence, the POS tag
   the gold word has there (``pos_check=True``; skipped, with a warning, without spaCy).

All candidates of all content words of a sequence are scored in ONE batched forward on top of the
sequence's key/value cache (:mod:`fused_concept.training.concepts.scoring`).

The result is a ``[B, T, max_synonyms]`` int64 tensor aligned with the tokens (row ``t`` is the set of
token ``x_t``, the layout ``fused_concept.hf.patch`` expects for ``concepts``). Synonym ids only, the
gold id excluded, ``-1`` pads; rows at position 0 and at non-content positions are all ``-1``. A
content position whose candidates all fail gets the gold id alone in column 0: it stays a content word
(in the paper's training its set is the gold word alone, so its concept loss equals its cross-entropy).

Sets are expensive to build: ``cache.py`` keeps them on disk.
"""

from __future__ import annotations

from typing import List

import torch

from fused_concept.training.concepts.content_words import (
    as_2d,
    content_word_mask,
    method_name,
    pos_in_context,
    resolve_nlp,
    sequence_text,
    vocab_of,
)

def _checked_mask(content_mask, ids: torch.Tensor) -> torch.Tensor:
    content_mask = torch.as_tensor(content_mask)
    if content_mask.dim() == 1:
        content_mask = content_mask[None]
    if content_mask.shape != ids.shape:
        raise ValueError(f"content_mask must have the shape of input_ids {tuple(ids.shape)}, "
                         f"got {tuple(content_mask.shape)}")
    return content_mask.bool().cpu()


def _candidates(vocab, logits: torch.Tensor, seq: torch.Tensor, rows: List[int], k: int) -> List[torch.Tensor]:
    """Candidate ids per content row: top-``k`` predictions at ``t-1`` that are ``" " + [A-Za-z0-9]+``, not
    the gold word in any casing; none where the next token continues the word (no whole-word swap)."""
    top = logits.float().topk(k, dim=-1).indices.cpu()
    seq = seq.cpu()
    out = []
    for row, t in enumerate(rows):
        cand = top[row]
        keep = vocab.candidate[cand] & (vocab.word_key[cand] != vocab.word_key[seq[t]])
        whole = t + 1 == seq.shape[0] or bool(vocab.word_end_ok[seq[t + 1]])
        out.append(cand[keep] if whole else cand[:0])
    return out


def _ranked(candidates: List[torch.Tensor], cosines: List[torch.Tensor], threshold: float, limit: int):
    """Per row, the candidate ids with cosine >= threshold, best first (ties keep the model's ranking)."""
    ranked = []
    for cand, cos in zip(candidates, cosines):
        passing = cos >= threshold
        order = torch.sort(cos[passing], descending=True, stable=True).indices
        ranked.append(cand[passing][order][:limit].tolist())
    return ranked


def _pos_checked(nlp, vocab, seq: torch.Tensor, rows: List[int], ranked: List[List[int]]) -> List[List[int]]:
    """Keep the candidates that spaCy tags, substituted into the decoded sequence, as it tags the gold word."""
    ids = seq.tolist()
    text, starts = sequence_text(vocab, ids)
    requests, owners = [], []
    for row, t in enumerate(rows):
        if not ranked[row]:
            continue
        gold = vocab.text[ids[t]]
        start = starts[t] + len(gold) - len(gold.lstrip())
        end = starts[t] + len(gold.rstrip())
        for word in [gold.strip()] + [vocab.text[c].strip() for c in ranked[row]]:
            requests.append((text, start, end, word))
        owners.append(row)
    tags = iter(pos_in_context(nlp, requests))
    kept = [list(r) for r in ranked]
    for row in owners:
        gold_tag = next(tags)
        candidate_tags = [next(tags) for _ in ranked[row]]
        kept[row] = [c for c, tag in zip(ranked[row], candidate_tags) if gold_tag is not None and tag == gold_tag]
    return kept


def _sequence_sets(base, head, vocab, seq, rows, *, top_k, limit, threshold, nlp, score_batch) -> List[List[int]]:
    """Synonym ids of each content row of one sequence (ranked, POS-checked when ``nlp`` is given)."""
    from fused_concept.training.concepts.scoring import score_sequence

    full = base(input_ids=seq[None], use_cache=True)
    hidden = full.last_hidden_state[0]
    logits = head.logits(hidden[torch.tensor(rows, device=seq.device) - 1])
    candidates = _candidates(vocab, logits, seq, rows, min(top_k, logits.shape[-1]))
    cosines = score_sequence(base, seq, full, rows, candidates, batch=score_batch)
    ranked = _ranked(candidates, cosines, threshold, limit)
    return ranked if nlp is None else _pos_checked(nlp, vocab, seq.cpu(), rows, ranked)


@torch.no_grad()
def build_concept_sets(
    model,
    tokenizer,
    input_ids,
    *,
    top_k=100,
    max_synonyms=10,
    threshold=0.75,
    content_mask=None,
    tagging="paper",
    pos_check=True,
    nlp="auto",
    progress=False,
    score_batch=1024,
):
    """Synonym sets for every token of ``input_ids`` ([B, T]): LongTensor [B, T, max_synonyms].

    Sequences run without attention mask: right padding is fine (pad tokens are special, hence never
    content, and cannot influence earlier positions); left padding is not.

    ``content_mask`` (default :func:`content_word_mask` with ``tagging`` and ``nlp``) picks the content
    rows; row ``t = 0`` never is one. ``pos_check`` runs the paper's POS check (needs spaCy: ``nlp``
    "auto" loads it; None skips the check). ``score_batch`` caps the candidates of one forward. The
    model runs in eval mode under ``no_grad``; the result lives on ``input_ids``' device.
    """
    from fused_concept.integrations.hf.model_head import base_model, model_head, unwrap_peft

    ids = as_2d(input_ids)
    if top_k < 1 or max_synonyms < 1:
        raise ValueError(f"top_k and max_synonyms must be >= 1, got {top_k} and {max_synonyms}")
    inner = unwrap_peft(model)
    base, head = base_model(inner), model_head(inner)
    vocab_size = head.weight.shape[0]
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise ValueError(f"input_ids contains id {int(ids[bad][0])} outside the model's vocabulary [0, {vocab_size})")
    nlp = resolve_nlp(nlp) if (pos_check or content_mask is None) else None
    if content_mask is None:
        content_mask = content_word_mask(tokenizer, ids, tagging=tagging, nlp=nlp)
    content_mask = _checked_mask(content_mask, ids)
    content_mask[:, 0] = False
    vocab = vocab_of(tokenizer, vocab_size)
    out = torch.full((*ids.shape, max_synonyms), -1, dtype=torch.long)
    bar = _progress_bar(progress, int(content_mask.sum()))
    was_training = inner.training
    inner.eval()
    try:
        for b in range(ids.shape[0]):
            rows = torch.nonzero(content_mask[b]).reshape(-1).tolist()
            if not rows:
                continue
            sets = _sequence_sets(base, head, vocab, ids[b].to(head.weight.device), rows, top_k=top_k,
                                  limit=max_synonyms, threshold=threshold, nlp=nlp if pos_check else None,
                                  score_batch=score_batch)
            for t, synonyms in zip(rows, sets):
                found = synonyms or [int(ids[b, t])]
                out[b, t, : len(found)] = torch.tensor(found)
            if bar is not None:
                bar.update(len(rows))
    finally:
        inner.train(was_training)
        if bar is not None:
            bar.close()
    return out.to(ids.device)


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="concept sets", unit="word")


def method(nlp="auto") -> str:
    """How :func:`content_word_mask` finds content words with ``nlp`` (recorded in metrics.json)."""
    return method_name(resolve_nlp(nlp))
