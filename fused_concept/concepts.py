"""Self-supervised concept sets: synonyms of each content word, found by the model itself.

The recipe follows the paper's embedding method (Zhang, Jurafsky, Shani 2026, "Learning Concepts, Not
Tokens"). For a content word at position ``t`` of a sequence ``x``:

1. candidates are the ``top_k`` (default 100) most likely next tokens predicted at position ``t-1``
   that are whole-word alphabetic tokens (same leading-space form as the gold token ``x_t``), other
   than ``x_t`` itself;
2. each candidate ``c`` is substituted at ``t``: ``x_0 .. x_{t-1} c``; its last-layer hidden state
   ``h_t(c)`` (the base model's final, normalised output at position ``t``) is compared with the
   original ``h_t(x_t)`` by cosine similarity;
3. the candidates with cosine ``>= threshold`` (0.75) are the word's synonyms, best first, at most
   ``max_synonyms`` (10).

All candidates of one position are scored in one batched forward pass of length 1 that reuses the
key/value cache of the prefix ``x_0 .. x_{t-1}`` (computed once for the whole sequence), so a
position costs ``top_k`` one-token steps rather than ``top_k`` full sequences.

The result is a ``[B, T, max_synonyms]`` int64 tensor aligned with the tokens (row ``t`` is the set of
token ``x_t``, the layout ``fused_concept.hf.patch`` expects for ``concepts``). Synonym ids only, the
gold id excluded, ``-1`` pads; rows at position 0 and at non-content positions are all ``-1``. A
content position for which no candidate passes gets the gold id alone in column 0: per the loss
contract a row that lists no id has no concept term, while a row listing only its gold id
(with ``include_target=True``) is a content row whose concept loss equals its cross-entropy.

Sets are expensive to build, so :func:`load_or_build_concepts` caches them on disk keyed by
:func:`fingerprint` (model + tokenizer) and by the build options and token ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings

import torch

__all__ = [
    "STOPWORDS",
    "content_word_mask",
    "build_concept_sets",
    "fingerprint",
    "load_or_build_concepts",
]

CACHE_FORMAT = "fused-concept-sets/1"

CONTENT_POS = frozenset({"NOUN", "VERB", "ADJ"})
SPACY_MODELS = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf")

# English function words (articles, pronouns, prepositions, conjunctions, auxiliaries and modal verbs,
# frequent adverbs and determiners, and the first halves of contractions that tokenizers split off).
STOPWORDS = frozenset(
    """
    a about above after again against all almost already also although always am among an and another
    any anybody anyone anything anyway anywhere are around as at be because been before being below
    beside besides between beyond both but by can cannot could did do does doing done down during each
    either else enough even ever every everybody everyone everything everywhere except few for from
    further had has have having he her here hers herself him himself his how however if in inside into
    is it its itself just least less many may me might mine more most much must my myself near neither
    never no nobody none nor not nothing now of off often on once one only onto or other others otherwise
    our ours ourselves out outside over own per perhaps quite rather really same shall she should since
    so some somebody someone something sometimes somewhere still such than that the their theirs them
    themselves then there therefore these they this those though through throughout thus till to
    together too toward towards under unless until up upon us very via was we well were what whatever
    when whenever where whereas wherever whether which while who whoever whom whose why will with within
    without would yet you your yours yourself yourselves
    isn aren wasn weren hasn haven hadn doesn don didn won wouldn shan shouldn couldn mustn mightn needn
    ain ll ve re
    """.split()
)


# ------------------------------------------------------------------------------------ vocabulary


class _Vocab:
    """Per-token surface facts, computed once per tokenizer (decoding every id takes well under a second).

    * ``text[i]``: ``tokenizer.decode([i])``;
    * ``space[i]``: the token starts a new word with a space (``"Ġcat"`` / ``"▁cat"`` / decodes to ``" cat"``);
    * ``alpha[i]``: the token, without that space, is an ASCII alphabetic word of 2+ letters;
    * ``ends_space[i]``: its text ends with whitespace (a newline, say), so the next token starts a word;
    * ``special[i]``: one of the tokenizer's special tokens.
    """

    def __init__(self, tokenizer, size=None):
        n_tok = len(tokenizer)
        size = max(n_tok, size or 0)
        ids = list(range(n_tok))
        raw = tokenizer.convert_ids_to_tokens(ids)
        text = tokenizer.batch_decode([[i] for i in ids])
        special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.size = size
        self.text = text + [""] * (size - n_tok)
        space = torch.zeros(size, dtype=torch.bool)
        alpha = torch.zeros(size, dtype=torch.bool)
        ends_space = torch.zeros(size, dtype=torch.bool)
        special = torch.zeros(size, dtype=torch.bool)
        self.word = [""] * size
        for i in ids:
            piece, surface = raw[i] or "", text[i]
            if i in special_ids:
                special[i] = True
                continue
            has_space = piece[:1] in ("Ġ", "▁") or surface[:1] == " "
            word = surface[1:] if surface[:1] == " " else surface
            if piece[:1] in ("Ġ", "▁") and surface[:1] != " ":
                word = surface  # tokenizers that strip the leading space when decoding one token
            space[i] = has_space
            alpha[i] = len(word) >= 2 and word.isascii() and word.isalpha()
            ends_space[i] = surface[-1:].isspace()
            self.word[i] = word
        self.space, self.alpha, self.ends_space, self.special = space, alpha, ends_space, special
        # A continuation token glues onto the previous word: no leading space and starts with a letter/digit.
        first = [(w[:1] if w else "") for w in self.word]
        self.continues = torch.tensor([bool(f) and f.isalnum() for f in first], dtype=torch.bool) & ~space & ~special


_VOCAB_CACHE = {}


def _vocab(tokenizer, size=None) -> _Vocab:
    """The :class:`_Vocab` of ``tokenizer`` covering at least ``size`` ids (cached for the last few tokenizers)."""
    entry = _VOCAB_CACHE.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer or entry[1].size < max(size or 0, len(tokenizer)):
        entry = (tokenizer, _Vocab(tokenizer, size))
        if len(_VOCAB_CACHE) >= 4:
            _VOCAB_CACHE.pop(next(iter(_VOCAB_CACHE)))
        _VOCAB_CACHE[id(tokenizer)] = entry
    return entry[1]


# ------------------------------------------------------------------------------------ content words


@functools.lru_cache(maxsize=1)
def _load_spacy():
    try:
        import spacy
    except Exception:
        return None
    for name in SPACY_MODELS:
        try:
            return spacy.load(name, disable=["ner", "lemmatizer"])
        except Exception:
            continue
    return None


def _as_2d(input_ids):
    if not torch.is_tensor(input_ids):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T] (or [T]), got shape {tuple(input_ids.shape)}")
    return input_ids.long()


def _single_token_words(vocab: _Vocab, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: token is a whole word by itself (word-initial, alphabetic, not continued)."""
    ids_c = ids.cpu().clamp(0, vocab.size - 1)
    in_range = (ids.cpu() >= 0) & (ids.cpu() < vocab.size)
    alpha = vocab.alpha[ids_c] & in_range
    special = vocab.special[ids_c] | ~in_range
    starts = vocab.space[ids_c].clone()
    starts[:, 0] = True
    starts[:, 1:] |= vocab.ends_space[ids_c[:, :-1]] | special[:, :-1]
    continued = torch.zeros_like(starts)
    continued[:, :-1] = vocab.continues[ids_c[:, 1:]] & ~special[:, 1:]
    return alpha & starts & ~continued


def _heuristic_mask(vocab: _Vocab, ids: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    ids_c = ids.cpu().clamp(0, vocab.size - 1)
    stop = torch.tensor([vocab.word[i].lower() in STOPWORDS for i in ids_c.reshape(-1).tolist()], dtype=torch.bool)
    return words & ~stop.reshape(ids.shape)


def _spacy_mask(vocab: _Vocab, ids: torch.Tensor, words: torch.Tensor, nlp) -> torch.Tensor:
    """Tag the decoded text with spaCy; a whole-word token is content when the spaCy token at its first
    letter is a NOUN, VERB or ADJ."""
    mask = torch.zeros_like(words)
    for b in range(ids.shape[0]):
        pieces, starts = [], []
        offset = 0
        for i in ids[b].tolist():
            piece = vocab.text[i] if 0 <= i < vocab.size and not vocab.special[i] else " "
            starts.append(offset + (1 if piece[:1] == " " else 0))
            pieces.append(piece)
            offset += len(piece)
        doc = nlp("".join(pieces))
        pos_at = {}
        for token in doc:
            pos_at[token.idx] = token.pos_
        for t in torch.nonzero(words[b]).reshape(-1).tolist():
            mask[b, t] = pos_at.get(starts[t]) in CONTENT_POS
    return mask


def content_word_mask(tokenizer, input_ids, *, nlp="auto") -> torch.Tensor:
    """[B, T] bool mask of the content-word positions of ``input_ids`` ([B, T] or [T]).

    A position can only be content when its token is a whole word by itself: it starts a word (has a
    leading space, or follows whitespace, a special token or the sequence start), is made of 2+ ASCII
    letters after that space, and the next token does not continue it (no leading space and starting
    with a letter or digit). Among those:

    * with spaCy (``nlp="auto"`` and ``spacy`` plus one of ``en_core_web_{sm,md,lg,trf}`` importable, or
      ``nlp`` a loaded spaCy pipeline): the token's word must be tagged NOUN, VERB or ADJ;
    * otherwise (``nlp=None``, or spaCy unavailable), the heuristic: the lower-cased word must not be in
      :data:`STOPWORDS`, the English function words listed in this module (articles, pronouns,
      prepositions, conjunctions, auxiliaries/modals, frequent adverbs and determiners, and the
      ``isn``/``don``/``ll``... halves of contractions). Everything else (nouns, verbs, adjectives,
      content adverbs, names) counts as content.

    Special tokens are never content. Multi-token words are never content (no single-token synonym
    could replace them).
    """
    ids = _as_2d(input_ids)
    vocab = _vocab(tokenizer)
    words = _single_token_words(vocab, ids)
    if isinstance(nlp, str):
        if nlp != "auto":
            raise ValueError(f"nlp must be 'auto', None or a spaCy pipeline, got {nlp!r}")
        nlp = _load_spacy()
    mask = _heuristic_mask(vocab, ids, words) if nlp is None else _spacy_mask(vocab, ids, words, nlp)
    return mask.to(ids.device)


def _mask_method(nlp="auto") -> str:
    if nlp is None:
        return "heuristic"
    if isinstance(nlp, str):
        loaded = _load_spacy()
        return "heuristic" if loaded is None else f"spacy:{loaded.meta.get('name')}-{loaded.meta.get('version')}"
    return "spacy:given"


# ------------------------------------------------------------------------------------ scoring


def _is_plain_dynamic(cache) -> bool:
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _shared_prefix_cache(full_cache, t: int):
    """A cache holding positions ``0..t-1`` of ``full_cache`` (batch 1) for a batch of one-token steps.

    The prefix keys/values are shared, not copied: each layer returns ``cat(prefix.expand(n), new)`` for
    the ``n`` candidates of the step and stores nothing, so the full cache can serve every position.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class _SharedPrefixLayer(DynamicLayer):
        def __init__(self, keys, values):
            super().__init__()
            self.keys, self.values = keys, values
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[0]
            keys = torch.cat([self.keys.expand(n, -1, -1, -1), key_states], dim=-2)
            values = torch.cat([self.values.expand(n, -1, -1, -1), value_states], dim=-2)
            return keys, values

    cache = DynamicCache()
    cache.layers = [_SharedPrefixLayer(layer.keys[:, :, :t], layer.values[:, :, :t]) for layer in full_cache.layers]
    return cache


def _score_candidates(base, seq, t, candidates, reference, full_cache=None):
    """Cosine between the last hidden state at ``t`` with ``seq[t]`` replaced by each candidate and ``reference``.

    One batched forward of the ``n`` candidates (length 1 each) on top of the prefix ``seq[:t]``'s
    key/value cache: the shared view of ``full_cache`` when it is a plain dynamic cache, otherwise the
    prefix is run once and its cache repeated over the batch.
    """
    n = candidates.shape[0]
    if full_cache is not None and _is_plain_dynamic(full_cache):
        cache = _shared_prefix_cache(full_cache, t)
    else:
        cache = base(input_ids=seq[None, :t], use_cache=True).past_key_values
        cache.batch_repeat_interleave(n)
    out = base(input_ids=candidates[:, None], past_key_values=cache, use_cache=True)
    hidden = out.last_hidden_state[:, -1].float()
    return torch.nn.functional.cosine_similarity(hidden, reference.float()[None], dim=-1)


def _score_by_recompute(base, seq, t, candidates, reference):
    """The same cosines as :func:`_score_candidates`, from full forward passes without any cache (tests)."""
    batch = seq[None, : t + 1].repeat(candidates.shape[0], 1)
    batch[:, t] = candidates
    hidden = base(input_ids=batch, use_cache=False).last_hidden_state[:, t].float()
    return torch.nn.functional.cosine_similarity(hidden, reference.float()[None], dim=-1)


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
    progress=False,
    score_batch=None,
):
    """Synonym sets for every token of ``input_ids`` ([B, T]): LongTensor [B, T, max_synonyms].

    Sequences run without attention mask: right padding is fine (pad tokens are special, hence never
    content, and cannot influence earlier positions); left padding is not.

    Row ``[b, t]`` lists, best first, the candidate ids (top ``top_k`` whole-word next-token predictions
    at ``t-1``, gold excluded) whose substitution at ``t`` keeps the last hidden state's cosine to the
    original at ``>= threshold``; ``-1`` pads. Rows at ``t = 0`` and where ``content_mask`` (default
    :func:`content_word_mask`) is False are all ``-1``. A content row with no synonym holds the gold id
    alone in column 0, so that it still counts as content in the loss (see the module docstring).
    ``score_batch`` caps how many candidates one forward scores (default: all of them at once; the
    transient memory of a step is about ``2 * n * layers * kv_heads * t * head_dim`` values per layer).
    The model runs in eval mode under ``no_grad``; the result lives on ``input_ids``' device.
    """
    from ._head import Head, base_model, unwrap_peft

    ids = _as_2d(input_ids)
    if top_k < 1 or max_synonyms < 1:
        raise ValueError(f"top_k and max_synonyms must be >= 1, got {top_k} and {max_synonyms}")
    if content_mask is None:
        content_mask = content_word_mask(tokenizer, ids)
    content_mask = torch.as_tensor(content_mask)
    if content_mask.dim() == 1:
        content_mask = content_mask[None]
    if content_mask.shape != ids.shape:
        raise ValueError(f"content_mask must have the shape of input_ids {tuple(ids.shape)}, got {tuple(content_mask.shape)}")
    content_mask = content_mask.bool().cpu()

    inner = unwrap_peft(model)
    base = base_model(inner)
    head = Head.of(inner)
    weight = head.weight
    vocab_size = weight.shape[0]
    vocab = _vocab(tokenizer, vocab_size)
    device = weight.device
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise ValueError(f"input_ids contains id {int(ids[bad][0])} outside the model's vocabulary [0, {vocab_size})")
    word_ok = vocab.alpha[:vocab_size].to(device) & ~vocab.special[:vocab_size].to(device)
    space = vocab.space[:vocab_size].to(device)
    k = min(top_k, vocab_size)

    out = torch.full((*ids.shape, max_synonyms), -1, dtype=torch.long)
    positions = [(b, t) for b in range(ids.shape[0]) for t in range(1, ids.shape[1]) if content_mask[b, t]]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(positions), desc="concept sets", unit="word")
    was_training = inner.training
    inner.eval()
    try:
        for b in range(ids.shape[0]):
            rows = [t for (bb, t) in positions if bb == b]
            if not rows:
                continue
            seq = ids[b].to(device)
            full = base(input_ids=seq[None], use_cache=True)
            hidden = full.last_hidden_state[0]
            cache = full.past_key_values
            prev = torch.tensor(rows, device=device) - 1
            logits = head.logits(hidden[prev])
            top = logits.float().topk(k, dim=-1).indices
            for row, t in enumerate(rows):
                gold = int(seq[t])
                cand = top[row]
                keep = word_ok[cand] & (space[cand] == space[gold]) & (cand != gold)
                cand = cand[keep]
                found = []
                if cand.numel():
                    step = score_batch or cand.numel()
                    cos = torch.cat([
                        _score_candidates(base, seq, t, cand[i : i + step], hidden[t], cache)
                        for i in range(0, cand.numel(), step)
                    ])
                    passing = cos >= threshold
                    if passing.any():
                        # stable sort: ties keep the model's ranking of the candidates
                        order = torch.sort(cos[passing], descending=True, stable=True).indices
                        found = cand[passing][order][:max_synonyms].tolist()
                if found:
                    out[b, t, : len(found)] = torch.tensor(found)
                else:
                    out[b, t, 0] = gold
                if bar is not None:
                    bar.update(1)
    finally:
        inner.train(was_training)
        if bar is not None:
            bar.close()
    return out.to(ids.device)


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
    key = {
        "top_k": int(kw.pop("top_k", 100)),
        "max_synonyms": int(kw.pop("max_synonyms", 10)),
        "threshold": float(kw.pop("threshold", 0.75)),
        "content_mask": _mask_method() if mask is None else _ids_digest(torch.as_tensor(mask).long()),
        "input_ids": _ids_digest(ids),
    }
    if kw:
        raise TypeError(f"unknown build_concept_sets options {sorted(kw)}")
    return key


def _save_atomic(path: str, payload: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_or_build_concepts(path, model, tokenizer, input_ids, **build_kw) -> torch.Tensor:
    """Concept sets for ``input_ids`` from the cache file ``path``, building (and saving) them when needed.

    * ``path`` exists, same :func:`fingerprint`, same options and ids: its sets are returned;
    * ``path`` exists with another model's fingerprint: ``ValueError`` (the file is left alone);
    * ``path`` exists for this model but other options or ids: rebuilt and overwritten (with a warning);
    * otherwise: :func:`build_concept_sets` ``(model, tokenizer, input_ids, **build_kw)``, saved atomically
      (temporary file in the same folder, then ``os.replace``).
    """
    path = os.fspath(path)
    ids = _as_2d(input_ids)
    fp = fingerprint(model, tokenizer)
    key = _build_key(tokenizer, ids, build_kw)
    if os.path.exists(path):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"concept cache {path} cannot be read ({exc}); delete it or pass another path") from exc
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path} is not a fused-concept concept cache ({CACHE_FORMAT}); delete it or pass another path")
        if data["fingerprint"] != fp:
            raise ValueError(
                f"concept cache {path} was built for model {data['fingerprint']}, not {fp}; "
                "delete it or pass another path"
            )
        if data["key"] == key:
            return data["concepts"].to(ids.device)
        changed = sorted(name for name in key if data["key"].get(name) != key[name])
        warnings.warn(f"concept cache {path} was built with other {', '.join(changed)}; rebuilding it", stacklevel=2)
    concepts = build_concept_sets(model, tokenizer, ids, **build_kw)
    _save_atomic(path, {"format": CACHE_FORMAT, "fingerprint": fp, "key": key, "concepts": concepts.cpu()})
    return concepts
