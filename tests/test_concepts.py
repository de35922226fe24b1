"""fused_concept.concepts: content-word mask, synonym sets from the model, on-disk cache.

The synonym tests use a tiny Llama whose layers add nothing (output projections zeroed), so the last
hidden state of a token is its normalised embedding and the cosines are the embeddings' cosines,
which the test sets by hand. The KV-cache scoring is checked on random full models against a
recompute without cache.
"""
import copy
import math
import os
import re

import pytest
import torch

from fused_concept import concepts as C
from fused_concept import hf

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [
    "<|endoftext|>", "<unk>",
    "The", "Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġmat", ".", "Ċ", "Dogs", "Ġrun", "Ġquickly", ",", "Ġand",
    "Ġfeline", "Ġkitten", "Ġtiger", "Ġdog", "Ġcar", "Cat", "Ġ42", "Ġun", "believ", "able", "ĠX", "'s",
    "Ġhouse", "Ġgreen", "Ġwas", "Ġhe", "Ġsmall", "Ġbig", "Ġred", "Ġtree", "Ġwalked", "Ġslowly",
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


def test_heuristic_mask_on_a_known_sentence(tok):
    text = "The cat sat on the mat.\nDogs run quickly, and the cat's house"
    ids = torch.tensor([tok(text)["input_ids"]])
    got = C.content_word_mask(tok, ids, nlp=None)[0].tolist()
    tokens = tok.convert_ids_to_tokens(ids[0])
    expected = {"Ġcat", "Ġsat", "Ġmat", "Dogs", "Ġrun", "Ġquickly", "Ġhouse"}
    assert tokens == ["The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", ".", "Ċ", "Dogs", "Ġrun", "Ġquickly", ",",
                      "Ġand", "Ġthe", "Ġcat", "'s", "Ġhouse"]
    assert got == [t in expected for t in tokens]


def test_heuristic_mask_word_pieces_and_specials(tok):
    ids = ids_of("<|endoftext|>", "Ġun", "believ", "able", "ĠX", "Ġ42", "Ġcat", "believ", "Ġtree", "<|endoftext|>",
                 "Cat", "Ġred")
    got = C.content_word_mask(tok, ids, nlp=None)[0].tolist()
    # un+believ+able is one word of three tokens; X is one letter; 42 is no word; cat is continued by
    # "believ"; "Cat" starts a word after the special token; specials never count
    assert got == [False, False, False, False, False, False, False, False, True, False, True, True]
    assert C.content_word_mask(tok, ids[0], nlp=None).shape == (1, 12)
    with pytest.raises(TypeError, match="integer"):
        C.content_word_mask(tok, ids.float(), nlp=None)


class _FakeSpacy:
    """Stands in for a spaCy pipeline: tags words from a table, reports character offsets like spaCy."""

    def __init__(self, tags):
        self.tags = tags

    def __call__(self, text):
        doc = []
        for m in re.finditer(r"[A-Za-z]+|[^\sA-Za-z]", text):
            doc.append(type("Tok", (), {"idx": m.start(), "pos_": self.tags.get(m.group(), "X")})())
        return doc


def test_spacy_path_keeps_nouns_verbs_adjectives(tok):
    ids = ids_of("The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġgreen", "Ġmat", "Ġquickly", ".")
    nlp = _FakeSpacy({"The": "DET", "cat": "NOUN", "sat": "VERB", "on": "ADP", "the": "DET", "green": "ADJ",
                      "mat": "NOUN", "quickly": "ADV"})
    got = C.content_word_mask(tok, ids, nlp=nlp)[0].tolist()
    assert got == [False, True, True, False, False, True, True, False, False]
    # the heuristic would have kept the adverb: the tagger really decides
    assert C.content_word_mask(tok, ids, nlp=None)[0, 7]


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
    for w in ("Ġcat", "Ġfeline", "Cat", "Ġ42", "<unk>"):
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


def test_hand_built_synonyms(tok, hand_model):
    ids = ids_of("Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat")
    mask = torch.tensor([[True, True, False, False, False, True]])
    V = len(WORDS)
    sets = C.build_concept_sets(hand_model, tok, ids, top_k=V, max_synonyms=4, content_mask=mask, progress=True)
    assert sets.shape == (1, 6, 4) and sets.dtype == torch.long
    # cos 1, 0.9, 0.8 pass 0.75 best first; dog (0.7) does not; Cat / 42 / <unk> are not same-form words
    assert _row(sets, 1) == ["Ġfeline", "Ġkitten", "Ġtiger", None]
    assert _row(sets, 0) == [None] * 4  # t = 0 has no prediction
    assert _row(sets, 2) == [None] * 4  # not content
    assert _row(sets, 5) == ["Ġmat", None, None, None]  # content, no synonym: gold alone

    fewer = C.build_concept_sets(hand_model, tok, ids, top_k=V, max_synonyms=2, threshold=0.85, content_mask=mask)
    assert _row(fewer, 1) == ["Ġfeline", "Ġkitten"]
    loose = C.build_concept_sets(hand_model, tok, ids, top_k=V, max_synonyms=5, threshold=0.65, content_mask=mask)
    assert _row(loose, 1) == ["Ġfeline", "Ġkitten", "Ġtiger", "Ġdog", None]

    # identical embeddings are synonyms of each other, whichever is the gold token
    swapped = ids_of("Ġthe", "Ġfeline", "Ġsat")
    back = C.build_concept_sets(hand_model, tok, swapped, top_k=V, content_mask=torch.tensor([[False, True, False]]))
    assert _row(back, 1)[:3] == ["Ġcat", "Ġkitten", "Ġtiger"]


def test_only_top_k_predictions_are_candidates(tok, hand_model):
    ids = ids_of("Ġthe", "Ġcat")
    mask = torch.tensor([[False, True]])
    # after " the" the model ranks feline, tiger first and kitten last: top 3 loses kitten
    sets = C.build_concept_sets(hand_model, tok, ids, top_k=3, content_mask=mask)
    assert _row(sets, 1)[:3] == ["Ġfeline", "Ġtiger", None]
    top = hand_model(ids).logits[0, 0].topk(3).indices.tolist()
    assert WORDS.index("Ġkitten") not in top


def test_default_mask_and_training_mode_restored(tok, hand_model):
    ids = ids_of("Ġthe", "Ġcat", "Ġon", "Ġthe", "Ġmat")
    hand_model.train()
    try:
        sets = C.build_concept_sets(hand_model, tok, ids, top_k=len(WORDS))
        assert hand_model.training
    finally:
        hand_model.eval()
    assert _row(sets, 1)[:3] == ["Ġfeline", "Ġkitten", "Ġtiger"]
    assert _row(sets, 2) == [None] * 10 and _row(sets, 4)[0] == "Ġmat"


# ------------------------------------------------------------------------------- KV-cache scoring


def _random_model(kind):
    torch.manual_seed(3)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=D, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_kv_cached_scoring_equals_full_recompute(kind):
    model = _random_model(kind)
    base = hf.base_model(model)
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(2, len(WORDS), (10,), generator=g)
    full = base(input_ids=seq[None], use_cache=True)
    cands = torch.randint(2, len(WORDS), (13,), generator=g)
    for t in (1, 5, 9):
        ref = full.last_hidden_state[0, t]
        cached = C._score_candidates(base, seq, t, cands, ref, full.past_key_values)
        repeated = C._score_candidates(base, seq, t, cands, ref, None)  # the fallback path
        recomputed = C._score_by_recompute(base, seq, t, cands, ref)
        assert (cached - recomputed).abs().max() < 1e-5
        assert (repeated - recomputed).abs().max() < 1e-5
        # the prefix matters: another prefix gives other cosines, so the test would see a wrong cache
        other = seq.flip(0)
        wrong = C._score_by_recompute(base, other, t, cands, ref)
        assert (wrong - recomputed).abs().max() > 1e-3
    assert full.past_key_values.get_seq_length() == 10  # the shared cache was not extended


@torch.no_grad()
def test_build_equals_brute_force_on_random_model(tok):
    model = _random_model("llama")
    base = hf.base_model(model)
    g = torch.Generator().manual_seed(5)
    words = [i for i, w in enumerate(WORDS) if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 2]
    seq = torch.tensor(words)[torch.randint(0, len(words), (8,), generator=g)]
    mask = torch.ones(1, 8, dtype=torch.bool)
    top_k = 12
    hidden = base(input_ids=seq[None]).last_hidden_state[0]
    logits = model(input_ids=seq[None]).logits[0]
    per_t = {}
    for t in range(1, 8):
        cand = [c for c in logits[t - 1].topk(top_k).indices.tolist() if c in words and c != int(seq[t])]
        cos = C._score_by_recompute(base, seq, t, torch.tensor(cand), hidden[t]) if cand else torch.zeros(0)
        per_t[t] = (cand, cos)
    every = torch.sort(torch.cat([c for _, c in per_t.values()])).values
    threshold = float(every[len(every) // 2 : len(every) // 2 + 2].mean())  # between two cosines: no ties
    got = C.build_concept_sets(model, tok, seq[None], top_k=top_k, max_synonyms=3, threshold=threshold,
                               content_mask=mask)
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
    monkeypatch.setattr(C, "build_concept_sets", lambda *a, **k: built.append(k) or real_build(*a, **k))
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


def test_heuristic_mask_with_the_smollm2_tokenizer():
    """The real tokenizer of the default model (byte-level BPE read from the GGUF file)."""
    smol = hf.load_default_tokenizer()
    text = "The old farmer walked slowly to the field.\nDogs are running, isn't it? Unbelievable horses"
    ids = torch.tensor([smol(text)["input_ids"]])
    pieces = [smol.decode([i]) for i in ids[0].tolist()]
    got = dict(zip(pieces, C.content_word_mask(smol, ids, nlp=None)[0].tolist()))
    assert pieces[:3] == ["The", " old", " farmer"] and " Un" in pieces  # the split assumed below
    content = {p for p, is_content in got.items() if is_content}
    assert content == {" old", " farmer", " walked", " slowly", " field", "Dogs", " running", " horses"}
