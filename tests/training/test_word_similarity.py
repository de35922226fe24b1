"""Word similarity (SimLex-999 / WordSim-353 Spearman) and the paired bootstrap, against independent oracles:
scipy's spearmanr, explicit per-word forwards in float64, and a loop over the same bootstrap draws."""
import math

import pytest
import torch

from fused_concept.training import word_similarity as W
from fused_concept.training.bootstrap import paired_bootstrap_ppl_diff

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def test_gensim_files_are_read_from_the_installed_package():
    simlex = W.read_pairs(W.data_path("simlex999"))
    wordsim = W.read_pairs(W.data_path("wordsim353"))
    assert len(simlex) == 999 and len(wordsim) == 353
    assert simlex[:2] == [("old", "new", 1.58), ("smart", "intelligent", 9.2)]
    assert ("tiger", "cat", 7.35) in wordsim


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    y = x + torch.randn(40, generator=g, dtype=torch.float64) * 2
    y[::5] = y[1]  # ties in y too
    assert W.spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    assert W.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


WORDS = ["<s>", "<unk>", "Ġcat", "Ġdog", "Ġtiger", "Ġcar", "Ġbi", "cycle", "Ġtree"]


@pytest.fixture(scope="module")
def tok():
    model = tokenizers.models.WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>",
                                        continuing_subword_prefix="")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")


def test_word_embeddings_and_scores_match_explicit_forwards(tok, monkeypatch, tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config).double().eval()
    assert tok(" bicycle", add_special_tokens=False)["input_ids"] == [6, 7]  # a two-token word
    words = ["cat", "dog", "tiger", "bicycle", "car", "tree"]
    got = W.word_embeddings(model, tok, words, batch_size=2)

    def explicit(word):  # BOS, then the word's tokens; mean of the final hidden states over the word
        ids = [0] + tok(" " + word, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, 1:].mean(dim=0)

    for word in words:
        torch.testing.assert_close(got[word].double(), explicit(word), rtol=1e-5, atol=1e-6)

    pairs = [("cat", "tiger", 8.0), ("cat", "car", 1.0), ("dog", "tree", 2.5), ("bicycle", "car", 6.0),
             ("tiger", "dog", 5.0)]
    path = tmp_path / "pairs.txt"
    path.write_text("# header\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs))
    monkeypatch.setattr(W, "data_path", lambda name: str(path))
    result = W.word_similarity(model, tok, names=("simlex999",))
    cosines = [float(torch.nn.functional.cosine_similarity(explicit(a), explicit(b), dim=0)) for a, b, _ in pairs]
    stats = pytest.importorskip("scipy.stats")
    want = stats.spearmanr(cosines, [s for _, _, s in pairs]).statistic
    assert result["word_similarity.simlex999.spearman"] == pytest.approx(want, abs=1e-9)
    assert result["word_similarity.simlex999.pairs"] == 5 and result["word_similarity.simlex999.coverage"] == 1.0


def test_paired_bootstrap_matches_a_loop_over_the_same_draws():
    g = torch.Generator().manual_seed(1)
    twin = torch.rand(50, generator=g, dtype=torch.float64) * 4
    run = twin + torch.randn(50, generator=g, dtype=torch.float64) * 0.3 - 0.2
    diff, low, high = paired_bootstrap_ppl_diff(run.tolist(), twin.tolist(), resamples=200, seed=7)
    draws = torch.randint(0, 50, (200, 50), generator=torch.Generator().manual_seed(7))
    stats = sorted(math.exp(run[d].mean()) - math.exp(twin[d].mean()) for d in draws)
    # linear interpolation between order statistics, as numpy.percentile / torch.quantile
    def percentile(q):
        pos = q * (len(stats) - 1)
        lo = int(math.floor(pos))
        return stats[lo] + (stats[min(lo + 1, len(stats) - 1)] - stats[lo]) * (pos - lo)
    assert diff == pytest.approx(math.exp(run.mean()) - math.exp(twin.mean()))
    assert (low, high) == (pytest.approx(percentile(0.025)), pytest.approx(percentile(0.975)))
    assert low < diff < high
    assert paired_bootstrap_ppl_diff(twin.tolist(), twin.tolist()) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="paired rows differ"):
        paired_bootstrap_ppl_diff([1.0], [1.0, 2.0])
