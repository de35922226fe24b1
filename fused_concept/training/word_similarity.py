"""Alignment with human similarity judgments: Spearman rho on SimLex-999 and WordSim-353.

The two data sets ship inside the PyPI package ``gensim`` (``gensim/test/test_data/simlex999.txt`` and
``wordsim353.tsv``: ``word1 <tab> word2 <tab> mean human score``, ``#`` comment lines). They are read from
the installed package, located without importing it.

Protocol. Each word is embedded alone: the text ``" " + word`` tokenised without special tokens, the
tokenizer's BOS token first when it has one, and the MEAN of the base model's final hidden states (the
normalised output the LM head reads) over the word's own tokens. A pair's model score is the cosine of
its two embeddings; the result is Spearman's rho (average ranks for ties) between the model scores and
the human scores over all pairs used. A pair is used when both words give at least one token (with a
byte-level tokenizer: always), so ``coverage`` is the fraction of the file's pairs used.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Tuple

import torch

DATASETS = {"simlex999": "simlex999.txt", "wordsim353": "wordsim353.tsv"}


def data_path(name: str) -> str:
    """Path of data set ``name`` (a key of :data:`DATASETS`) inside the installed gensim package."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("word similarity needs the PyPI package gensim (its test data holds SimLex-999 and "
                                "WordSim-353): pip install gensim==4.4.0")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "test", "test_data", DATASETS[name])
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{DATASETS[name]} not found in gensim's test data")


def read_pairs(path: str) -> List[Tuple[str, str, float]]:
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip() or line.startswith("#"):
                continue
            first, second, score = line.rstrip("\n").split("\t")[:3]
            pairs.append((first.strip(), second.strip(), float(score)))
    return pairs


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of the ranks, ties given their average rank."""
    rx, ry = _ranks(torch.as_tensor(x, dtype=torch.float64)), _ranks(torch.as_tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


@torch.no_grad()
def word_embeddings(model, tokenizer, words: List[str], *, batch_size: int = 256) -> Dict[str, torch.Tensor]:
    """Mean final hidden state [D] (float32) of each word (see the module docstring); words that give no
    token are left out. Words are batched by token count, so no padding or attention mask is needed."""
    from fused_concept.integrations.hf.model_head import base_model, unwrap_peft

    inner = unwrap_peft(model)
    base = base_model(inner)
    device = next(inner.parameters()).device
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [] if bos is None else [bos]
    by_length: Dict[int, List[Tuple[str, List[int]]]] = {}
    for word in dict.fromkeys(words):
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if ids:
            by_length.setdefault(len(ids), []).append((word, prefix + ids))
    was_training = inner.training
    inner.eval()
    out = {}
    try:
        for length, group in sorted(by_length.items()):
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                ids = torch.tensor([seq for _, seq in chunk], device=device)
                hidden = base(input_ids=ids, use_cache=False).last_hidden_state[:, len(prefix):].float().mean(dim=1)
                out.update({word: vector.cpu() for (word, _), vector in zip(chunk, hidden)})
    finally:
        inner.train(was_training)
    return out


def word_similarity(model, tokenizer, names=tuple(DATASETS)) -> Dict[str, float]:
    """``{"word_similarity.<name>.spearman" | ".pairs" | ".coverage": value}`` for each data set."""
    datasets = {name: read_pairs(data_path(name)) for name in names}
    vectors = word_embeddings(model, tokenizer, [w for pairs in datasets.values() for p in pairs for w in p[:2]])
    result = {}
    for name, pairs in datasets.items():
        used = [(a, b, s) for a, b, s in pairs if a in vectors and b in vectors]
        cosines = [float(torch.nn.functional.cosine_similarity(vectors[a], vectors[b], dim=0)) for a, b, _ in used]
        result[f"word_similarity.{name}.spearman"] = spearman(cosines, [s for _, _, s in used])
        result[f"word_similarity.{name}.pairs"] = len(used)
        result[f"word_similarity.{name}.coverage"] = len(used) / len(pairs)
    return result
