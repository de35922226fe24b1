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
sequence's key/value cache (``scoring.py``).

The result is a ``[B, T, max_synonyms]`` int64 tensor aligned with the tokens (row ``t`` is the set of
token ``x_t``, the layout ``fused_concept.hf.patch`` expects for ``concepts``). Synonym ids only, the
gold id excluded, ``-1`` pads; rows at position 0 and at non-content positions are all ``-1``. A
content position whose candidates all fail gets the gold id alone in column 0: it stays a content word
(in the paper's training its set is the gold word alone, so its concept loss equals its cross-entropy).

Sets are expensive to build, so :func:`load_or_build_concepts` caches them on disk keyed by
:func:`fingerprint` (model + tokenizer) and by the build options and token ids (``cache.py``).
Content words: ``content_words.py``; building: ``build.py``.
"""
from fused_concept.training.concepts.build import build_concept_sets, method
from fused_concept.training.concepts.cache import CACHE_FORMAT, fingerprint, load_or_build_concepts
from fused_concept.training.concepts.content_words import CONTENT_POS, STOPWORDS, content_word_mask

__all__ = [
    "STOPWORDS",
    "CONTENT_POS",
    "content_word_mask",
    "build_concept_sets",
    "fingerprint",
    "load_or_build_concepts",
    "method",
    "CACHE_FORMAT",
]
