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
sequence's key/value cache (:mod:`fused_concept._candidate_scoring`).

The result is a ``[B, T, max_synonyms]`` int64 tensor aligned with the tokens (row ``t`` is the set of
token ``x_t``, the layout ``fused_concept.hf.patch`` expects for ``concepts``). Synonym ids only, the
gold id excluded, ``-1`` pads; rows at position 0 and at non-content positions are all ``-1``. A
content position whose candidates all fail gets the gold id alone in column 0: it stays a content word
(in the paper's training its set is the gold word alone, so its concept loss equals its cross-entropy).

Sets are expensive to build, so :func:`load_or_build_concepts` caches them on disk keyed by
:func:`fingerprint` (model + tokenizer) and by the build options and token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import List

import torch

from ._content_words import (
    CONTENT_POS,
    STOPWORDS,
    TAGGINGS,
    as_2d,
    content_word_mask,
    method_name,
    pos_in_context,
    resolve_nlp,
    sequence_text,
    vocab_of,
)
from ._durable import UnreadableFile, checksum, load_plain, matches, save_atomic

__all__ = [
    "STOPWORDS",
    "CONTENT_POS",
    "content_word_mask",
    "build_concept_sets",
    "fingerprint",
    "load_or_build_concepts",
]

_FORMAT_NAME = "fused-concept-sets"
CACHE_FORMAT = f"{_FORMAT_NAME}/3"  # /3: adds "checksum"


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
    from ._candidate_scoring import score_sequence

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
    from ._head import Head, base_model, unwrap_peft

    ids = as_2d(input_ids)
    if top_k < 1 or max_synonyms < 1:
        raise ValueError(f"top_k and max_synonyms must be >= 1, got {top_k} and {max_synonyms}")
    inner = unwrap_peft(model)
    base, head = base_model(inner), Head.of(inner)
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


# ------------------------------------------------------------------------------------ caching


# Config entries that do not change what the model computes for given ids: paths, versions, dtype,
# kernels, and run-time switches (cache, outputs) that training code flips.
_CONFIG_KEYS_IGNORED = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                        "quantization_config", "dtype", "torch_dtype", "_attn_implementation",
                        "_attn_implementation_internal", "_experts_implementation", "use_cache",
                        "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
                        "torchscript", "pad_token_id", "gradient_checkpointing"}


def _sample_values(param: torch.Tensor, count: int = 32) -> bytes:
    flat = param.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    count = min(n, count)
    idx = torch.unique(torch.arange(count) * (n - 1) // max(1, count - 1)).to(flat.device)
    return flat[idx].float().cpu().numpy().tobytes()


def fingerprint(model, tokenizer) -> str:
    """``"<model_type>-<16 hex>"``: a hash of the model config (minus paths, versions, dtype and run-time
    switches such as ``use_cache``), sampled values of the first, last and head parameters, and the
    tokenizer's vocabulary size and a sample of its tokens. Two loads of the same weights and tokenizer
    agree; another model, config or vocabulary differs.
    """
    from ._head import Head, unwrap_peft

    inner = unwrap_peft(model)
    config = inner.config.to_dict()
    config = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = [p for _, p in inner.named_parameters()]
    head = Head.of(inner).weight
    for p in (params[0], params[-1], head):
        digest.update(str(tuple(p.shape)).encode())
        digest.update(_sample_values(p))
    n_tok = len(tokenizer)
    sample = list(range(0, n_tok, max(1, n_tok // 64))) + list(range(max(0, n_tok - 8), n_tok))
    digest.update(str(n_tok).encode())
    digest.update("\x00".join(str(s) for s in tokenizer.convert_ids_to_tokens(sample)).encode())
    model_type = getattr(inner.config, "model_type", None) or type(inner).__name__
    return f"{model_type}-{digest.hexdigest()[:16]}"


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().long().contiguous().numpy().tobytes() + str(tuple(ids.shape)).encode()).hexdigest()


def _build_key(tokenizer, ids, build_kw) -> dict:
    """What, besides the model, decides the sets: options, the content mask (or how it is made) and the ids."""
    kw = dict(build_kw)
    kw.pop("progress", None)
    kw.pop("score_batch", None)
    mask = kw.pop("content_mask", None)
    nlp = kw.pop("nlp", "auto")
    tagging = kw.pop("tagging", "paper")
    if tagging not in TAGGINGS:
        raise ValueError(f"tagging must be one of {TAGGINGS}, got {tagging!r}")
    key = {
        "top_k": int(kw.pop("top_k", 100)),
        "max_synonyms": int(kw.pop("max_synonyms", 10)),
        "threshold": float(kw.pop("threshold", 0.75)),
        "pos_check": bool(kw.pop("pos_check", True)),
        "nlp": method(nlp),
        "content_mask": tagging if mask is None else _ids_digest(torch.as_tensor(mask).long()),
        "input_ids": _ids_digest(ids),
    }
    if kw:
        raise TypeError(f"unknown build_concept_sets options {sorted(kw)}")
    return key


def load_or_build_concepts(path, model, tokenizer, input_ids, **build_kw) -> torch.Tensor:
    """Concept sets for ``input_ids`` from the cache file ``path``, building (and saving) them when needed.

    * ``path`` exists, intact, same :func:`fingerprint`, same options and ids: its sets are returned;
    * ``path`` exists with another model's fingerprint: ``ValueError`` (the file is left alone);
    * ``path`` holds something that is not a concept cache: ``ValueError`` (the file is left alone);
    * ``path`` exists for this model but other options or ids, is damaged (unreadable, or its checksum
      does not match its content) or has an older format: rebuilt and overwritten, with a warning;
    * otherwise: :func:`build_concept_sets` ``(model, tokenizer, input_ids, **build_kw)``.

    The file is written atomically (a temp file of its own in the same folder, fsync, ``os.replace``):
    processes building the same path at once each write a complete file and the last one stays.
    """
    path = os.fspath(path)
    ids = as_2d(input_ids)
    fp = fingerprint(model, tokenizer)
    key = _build_key(tokenizer, ids, build_kw)
    cached = _read_cache(path, fp, key) if os.path.exists(path) else None
    if cached is not None:
        return cached.to(ids.device)
    concepts = build_concept_sets(model, tokenizer, ids, **build_kw).cpu()
    content = {"fingerprint": fp, "key": key, "concepts": concepts}
    save_atomic(path, {"format": CACHE_FORMAT, **content, "checksum": checksum(content)})
    return concepts.to(ids.device)


def _read_cache(path: str, fp: str, key: dict):
    """The sets stored in the cache file ``path`` when it is intact and was built for model ``fp`` with
    ``key``; None (after a warning saying why) when it must be rebuilt. Raises for another model's
    file or a file that is no concept cache (neither is overwritten)."""
    try:
        data = load_plain(path, "concept cache")
    except UnreadableFile as exc:
        warnings.warn(f"{exc}; rebuilding it", stacklevel=3)
        return None
    found = data.get("format") if isinstance(data, dict) else None
    if not (isinstance(found, str) and found.startswith(_FORMAT_NAME + "/")):
        raise ValueError(f"{path} is not a fused-concept concept cache ({CACHE_FORMAT}); "
                         "delete it or pass another path")
    if found != CACHE_FORMAT:
        warnings.warn(f"concept cache {path} has the older format {found}, not {CACHE_FORMAT}; rebuilding it",
                      stacklevel=3)
        return None
    content = {name: data.get(name) for name in ("fingerprint", "key", "concepts")}
    if not (isinstance(content["concepts"], torch.Tensor) and matches(content, data.get("checksum"))):
        warnings.warn(f"concept cache {path} is damaged (its checksum does not match its content); rebuilding it",
                      stacklevel=3)
        return None
    if content["fingerprint"] != fp:
        raise ValueError(
            f"concept cache {path} was built for model {content['fingerprint']}, not {fp}; "
            "delete it or pass another path"
        )
    if content["key"] == key:
        return content["concepts"]
    changed = sorted(name for name in key if content["key"].get(name) != key[name])
    warnings.warn(f"concept cache {path} was built with other {', '.join(changed)}; rebuilding it", stacklevel=3)
    return None
