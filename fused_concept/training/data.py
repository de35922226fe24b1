"""Text corpora and token sequences for the reference training loop.

The embedded default corpus needs no network: it is the English prose of the Python Language
Reference that ships with every CPython installation (``pydoc_data.topics``, the text behind
``help("if")``). Only running prose is kept: headings, grammar rules and indented code examples
are dropped, and each paragraph is re-flowed onto one line. The result is deterministic for a given
Python version; ``corpus_fingerprint`` names it in the metrics so runs can be compared.

Other corpora: ``--data`` takes a ``.txt`` file (used as is), a ``.jsonl`` file (one JSON object
per line; its ``"text"`` field), or a Hugging Face ``datasets`` name when that package is installed
and the hub is reachable (its ``train`` split's ``"text"`` column).

The text is tokenised once and cut into non-overlapping chunks of ``seq_len`` tokens. The first
chunks are the training part, the last chunks the held-out part, so the two never share text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from typing import List, NamedTuple, Optional

import torch

DEFAULT_CORPUS_NAME = "python-language-reference (pydoc_data.topics, ships with CPython)"


class DataError(ValueError):
    """A problem with the ``--data`` argument or the text it names."""


class TokenData(NamedTuple):
    """Token sequences and their aligned concept sets.

    ``*_ids`` are Long [num_sequences, seq_len]; ``*_concepts`` are Long [num_sequences, seq_len, K]
    with ``concepts[b, t]`` the concept set of the TOKEN ``ids[b, t]`` (``-1`` pads). The loop
    predicts ``ids[:, 1:]`` from ``ids[:, :-1]``, so row (b, t) uses ``concepts[b, t + 1]``.
    """

    train_ids: torch.Tensor
    train_concepts: torch.Tensor
    heldout_ids: torch.Tensor
    heldout_concepts: torch.Tensor


def _prose_paragraphs(text: str) -> List[str]:
    """Paragraphs of running English prose from reStructuredText-like reference text."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.startswith((" ", "\t")) for line in lines):
            continue  # grammar rules, code examples, nested lists
        if any(re.fullmatch(r"[*=\-~^\"']{3,}", line.strip()) for line in lines):
            continue  # a heading and its underline
        paragraph = " ".join(line.strip() for line in lines).strip()
        words = paragraph.split()
        if len(words) < 12:
            continue
        letters = sum(ch.isalpha() or ch.isspace() for ch in paragraph)
        if letters < 0.85 * len(paragraph):
            continue  # mostly symbols: a table or an expression
        kept.append(paragraph)
    return kept


def default_corpus_text() -> str:
    """The embedded English corpus: prose paragraphs of the Python Language Reference, in topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split it out of the standard library
        raise DataError(
            "the default corpus needs the standard library's pydoc_data module, which this Python lacks; "
            "pass --data FILE.txt or FILE.jsonl instead"
        ) from exc
    paragraphs = []
    for key in sorted(topics):
        paragraphs.extend(_prose_paragraphs(topics[key]))
    return "\n".join(paragraphs)


def _read_jsonl(path: str) -> str:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"--data {path}: line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'--data {path}: line {number} has no string "text" field')
            texts.append(record["text"])
    return "\n".join(texts)


def _read_datasets_name(name: str) -> str:
    try:
        import datasets  # optional; not in requirements.txt
    except ImportError:
        raise DataError(
            f"--data {name!r}: no such file, and the `datasets` package (needed to load a dataset by name) "
            "is not installed; pass a .txt or .jsonl file"
        ) from None
    try:
        split = datasets.load_dataset(name, split="train")
    except Exception as exc:  # network errors, unknown names
        raise DataError(f"--data {name!r}: no such file, and loading it as a dataset failed: {exc}") from None
    if "text" not in split.column_names:
        raise DataError(f"--data {name!r}: the dataset has no 'text' column (columns: {split.column_names})")
    return "\n".join(split["text"])


def check_data_argument(data: Optional[str]) -> None:
    """Refuse a ``--data`` value that cannot name a corpus, without reading it: ``DataError`` when it is
    empty, a directory, a file of an unsupported type, a path to a file that does not exist, or a dataset
    name without the ``datasets`` package to load it."""
    if data is None:
        return
    if not isinstance(data, str) or not data.strip():
        raise DataError(f"--data must be a .txt or .jsonl file or a dataset name, got {data!r}")
    lower = data.lower()
    if os.path.isdir(data):
        raise DataError(f"--data {data}: is a directory; pass a .txt or .jsonl file")
    if os.path.exists(data):
        if not lower.endswith((".txt", ".jsonl")):
            raise DataError(f"--data {data}: unsupported file type; use a .txt or .jsonl file")
    elif lower.endswith((".txt", ".jsonl", ".json")) or _looks_like_a_path(data):
        raise DataError(f"--data {data}: file not found")
    elif importlib.util.find_spec("datasets") is None:
        raise DataError(f"--data {data}: no such file, and the `datasets` package (needed to load a dataset by "
                        "name) is not installed; pass a .txt or .jsonl file")


def _looks_like_a_path(data: str) -> bool:
    """A path rather than a dataset name ("name" or "org/name")."""
    return data.startswith(("/", ".", "~")) or data.count("/") > 1 or (os.sep != "/" and os.sep in data)


def load_text(data: Optional[str]) -> str:
    """The training text named by ``--data`` (``None``: the embedded default corpus).

    Raises ``DataError`` with a message naming the argument when the file is missing, is a directory,
    has an unsupported extension, is malformed, or holds no text.
    """
    if data is None:
        return default_corpus_text()
    check_data_argument(data)
    if not os.path.exists(data):
        text = _read_datasets_name(data)
    elif data.lower().endswith(".txt"):
        with open(data, encoding="utf-8") as handle:
            text = handle.read()
    else:
        text = _read_jsonl(data)
    if not text.strip():
        raise DataError(f"--data {data}: contains no text")
    return text


def corpus_fingerprint(text: str) -> str:
    """Short content hash of a corpus, recorded in the metrics."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def token_chunks(tokenizer, text: str, seq_len: int, *, bos: bool = True) -> torch.Tensor:
    """Tokenise ``text`` and cut it into non-overlapping chunks: Long [num_chunks, seq_len].

    With ``bos`` and a tokenizer that has a BOS token, each chunk is that token followed by ``seq_len - 1``
    text tokens (the paper's sequences start with BOS); otherwise ``seq_len`` text tokens.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one input and one target), got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    width = seq_len if bos_id is None else seq_len - 1
    num_chunks = len(ids) // width
    chunks = torch.tensor(ids[: num_chunks * width], dtype=torch.long).view(num_chunks, width)
    if bos_id is None:
        return chunks
    return torch.cat([torch.full((num_chunks, 1), bos_id, dtype=torch.long), chunks], dim=1)


def split_train_heldout(chunks: torch.Tensor, num_train: int, num_heldout: int, *, source: str = "the corpus"):
    """First ``num_train`` chunks for training, last ``num_heldout`` for evaluation (disjoint text)."""
    if num_train < 1 or num_heldout < 1:
        raise ValueError(f"need at least one training and one held-out sequence, got {num_train} and {num_heldout}")
    if chunks.shape[0] < num_train + num_heldout:
        raise DataError(
            f"{source} gives {chunks.shape[0]} sequences of {chunks.shape[1]} tokens, fewer than the "
            f"{num_train} training + {num_heldout} held-out sequences asked for; use a longer text or "
            "smaller --num-train / --num-heldout"
        )
    return chunks[:num_train].clone(), chunks[chunks.shape[0] - num_heldout :].clone()


def heldout_chunks(chunks: torch.Tensor, num_heldout: int, *, source: str = "the corpus") -> torch.Tensor:
    """The last ``num_heldout`` chunks alone: the held-out part of `split_train_heldout` (for evaluation)."""
    if num_heldout < 1:
        raise ValueError(f"need at least one held-out sequence, got {num_heldout}")
    if chunks.shape[0] < num_heldout:
        raise DataError(f"{source} gives {chunks.shape[0]} sequences of {chunks.shape[1]} tokens, fewer than the "
                        f"{num_heldout} held-out sequences asked for; use a longer text or a smaller --num-heldout")
    return chunks[chunks.shape[0] - num_heldout :].clone()
