"""The table of bad inputs in docs/math.md, walked on every implementation.

Each row of the table names the argument, the bad input and the exact error (type and message) for the
inputs below: hidden [6, 8] float32, weight [50, 8], bias [50], targets [6], concepts [6, 3]. This file
holds one way to produce each row's bad input; the test checks that the two lists name the same rows
and that every implementation raises exactly the documented error. The vocabulary-parallel loss checks
the head's layout across ranks before anything else, so a few of its messages differ (VOCAB_PARALLEL).
"""
import os
import re

import pytest
import torch

from helpers.impls import IMPLS, loss_fn, one_rank_group

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "math.md")
N, V, D, K = 6, 50, 8, 3


def base():
    g = torch.Generator().manual_seed(0)
    return dict(hidden=torch.randn(N, D, generator=g), weight=torch.randn(V, D, generator=g),
                targets=torch.randint(0, V, (N,), generator=g), concepts=torch.randint(0, V, (N, K), generator=g),
                bias=torch.randn(V, generator=g))


def with_id(name, value):
    def make(a):
        ids = a[name].clone()
        ids.view(-1)[1] = value
        return {name: ids}
    return make


# (argument, bad input) -> the change to `base()` (a dict of replaced arguments / added options)
CASES = {
    ("hidden", "a list"): lambda a: {"hidden": a["hidden"].tolist()},
    ("hidden", "integer dtype"): lambda a: {"hidden": a["hidden"].long()},
    ("hidden", "one dimension [8]"): lambda a: {"hidden": a["hidden"][0], "targets": a["targets"][0],
                                               "concepts": a["concepts"][0]},
    ("weight", "float64 with float32 hidden"): lambda a: {"weight": a["weight"].double()},
    ("weight", "three dimensions [1, 50, 8]"): lambda a: {"weight": a["weight"][None]},
    ("weight", "hidden size 7 for D = 8"): lambda a: {"weight": a["weight"][:, :7]},
    ("weight", "no rows [0, 8]"): lambda a: {"weight": a["weight"][:0], "bias": None,
                                            "targets": torch.full((N,), -100),
                                            "concepts": None},
    ("weight", "on another device"): lambda a: {"weight": a["weight"].to("meta"), "bias": None},
    ("bias", "float64"): lambda a: {"bias": a["bias"].double()},
    ("bias", "[49] for V = 50"): lambda a: {"bias": a["bias"][:49]},
    ("targets", "a list"): lambda a: {"targets": a["targets"].tolist()},
    ("targets", "float dtype"): lambda a: {"targets": a["targets"].float()},
    ("targets", "shape [5] for 6 rows"): lambda a: {"targets": a["targets"][:5]},
    ("targets", "id 50 = V"): with_id("targets", 50),
    ("targets", "id -7 (not ignore_index)"): with_id("targets", -7),
    ("concepts", "float dtype"): lambda a: {"concepts": a["concepts"].float()},
    ("concepts", "shape [5, 3] for 6 rows"): lambda a: {"concepts": a["concepts"][:5]},
    ("concepts", "id 777"): with_id("concepts", 777),
    ("concepts", "id -2 (the pad is -1)"): with_id("concepts", -2),
    ("concept_probs", "without concepts"): lambda a: {"concepts": None, "concept_probs": torch.rand(N, K)},
    ("concept_probs", 'with mode="marginal"'): lambda a: {"concept_probs": torch.rand(N, K)},
    ("concept_probs", 'missing with mode="soft"'): lambda a: {"mode": "soft"},
    ("concept_probs", "shape [6, 2] for concepts [6, 3]"): lambda a: {"mode": "soft",
                                                                      "concept_probs": torch.rand(N, 2)},
    ("concept_probs", "integer dtype"): lambda a: {"mode": "soft", "concept_probs": torch.ones(N, K, dtype=torch.long)},
    ("ntp_weight", "shape [5] for 6 rows"): lambda a: {"ntp_weight": torch.ones(5)},
    ("ntp_weight", "on another device"): lambda a: {"ntp_weight": torch.ones(N, device="meta")},
    ("concept_weight", 'a string "high"'): lambda a: {"concept_weight": "high"},
    ("concept_weight", "bool tensor"): lambda a: {"concept_weight": torch.ones(N, dtype=torch.bool)},
    ("mode", '"hard"'): lambda a: {"mode": "hard"},
    ("reduction", '"avg"'): lambda a: {"reduction": "avg"},
    ("margin", 'a string "0.5"'): lambda a: {"margin": "0.5"},
    ("margin", "NaN"): lambda a: {"margin": float("nan")},
    ("margin", "-0.1"): lambda a: {"margin": -0.1},
    ("margin", "1.5"): lambda a: {"margin": 1.5},
    ("softcap", "0"): lambda a: {"softcap": 0.0},
    ("softcap", "inf"): lambda a: {"softcap": float("inf")},
    ("z_loss", "-0.001"): lambda a: {"z_loss": -1e-3},
    ("z_loss", "NaN"): lambda a: {"z_loss": float("nan")},
    ("label_smoothing", "1.5"): lambda a: {"label_smoothing": 1.5},
    ("label_smoothing", "-0.1"): lambda a: {"label_smoothing": -0.1},
    ("shift", 'a string "yes"'): lambda a: {"shift": "yes"},
    ("include_target", 'a string "no"'): lambda a: {"include_target": "no"},
    ("ignore_index", "None"): lambda a: {"ignore_index": None},
    ("impl", '"cuda"'): lambda a: {"impl": "cuda"},
    ("kernel_options", 'an unknown key with impl="triton"'): lambda a: {"impl": "triton",
                                                                        "kernel_options": {"fast": True}},
    ("kernel_options", 'any with impl="torch"'): lambda a: {"impl": "torch",
                                                            "kernel_options": {"deterministic": False}},
    ("hidden", 'float64 with impl="triton"'): lambda a: {"impl": "triton", "hidden": a["hidden"].double(),
                                                         "weight": a["weight"].double(), "bias": None},
}

# rows that pick the implementation themselves: only concept_loss takes impl / kernel_options
CONCEPT_LOSS_ONLY = {("impl", '"cuda"'), ("kernel_options", 'an unknown key with impl="triton"'),
                     ("kernel_options", 'any with impl="torch"'), ("hidden", 'float64 with impl="triton"')}

# the vocabulary-parallel loss publishes the shard layout first (distributed._check_table)
VOCAB_PARALLEL = {
    ("weight", "three dimensions [1, 50, 8]"):
        (ValueError, "weight_shard on rank 0 of the group must be a 2-D tensor [V_shard, D]"),
    ("bias", "[49] for V = 50"): (ValueError, "bias on rank 0 must be [50] to match its weight_shard, got length 49"),
}


def documented_rows():
    """(argument, bad input) -> (error type name, message) from the table under '## Bad input'."""
    text = open(DOC).read()
    section = text.split("\n## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 3 or cells[0] in ("argument", "---") or set(cells[0]) <= {"-"}:
            continue
        argument = cells[0].strip("`")
        match = re.fullmatch(r"`(\w+)`: (.*)", cells[2])
        assert match, f"docs/math.md bad-input row not in the form `Error`: message: {line}"
        key = (argument, cells[1].replace("\\|", "|"))
        assert key not in rows, f"docs/math.md lists {key} twice"
        rows[key] = (match.group(1), match.group(2).replace("\\|", "|"))
    return rows


@pytest.fixture(scope="module", autouse=True)
def group(tmp_path_factory):
    with one_rank_group(tmp_path_factory.mktemp("group")):
        yield


def test_table_and_cases_name_the_same_rows():
    rows = documented_rows()
    assert set(rows) == set(CASES), (sorted(set(rows) - set(CASES)), sorted(set(CASES) - set(rows)))


def call(impl, changes):
    args = {**base(), **changes}
    hidden, weight, targets, concepts = (args.pop(k) for k in ("hidden", "weight", "targets", "concepts"))
    if "impl" in args:  # the row chooses the implementation
        import fused_concept as fc

        return fc.concept_loss(hidden, weight, targets, concepts, **args)
    return loss_fn(impl)(hidden, weight, targets, concepts, **args)


# every row on every implementation, except the rows that select their own implementation (run once)
WALK = [(impl, row) for row in sorted(CASES) for impl in IMPLS if row not in CONCEPT_LOSS_ONLY or impl == "torch"]


@pytest.mark.parametrize("impl, row", WALK, ids=[f"{impl}-{row[0]}: {row[1]}" for impl, row in WALK])
def test_bad_input_raises_the_documented_error(impl, row):
    error, message = documented_rows()[row]
    if impl == "vocab_parallel" and row in VOCAB_PARALLEL:
        kind, message = VOCAB_PARALLEL[row]
        error = kind.__name__
    with pytest.raises(Exception) as info:
        call(impl, CASES[row](base()))
    assert type(info.value).__name__ == error, (type(info.value), info.value)
    assert str(info.value) == message
    assert row[0] in message  # names the argument
