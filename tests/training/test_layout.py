"""The training zone's shape: imports that point one way, recipes as files shipped with the
package, and ONE metrics registry that every report reads (adding a metric is one entry)."""
import ast
import dataclasses
import glob
import json
import math
import os
import re

import pytest
import torch

import fused_concept
from fused_concept.training import metrics as registry

PACKAGE = os.path.dirname(os.path.abspath(fused_concept.__file__))
TRAINING = os.path.join(PACKAGE, "training")
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(folder):
    return sorted(glob.glob(os.path.join(folder, "**", "*.py"), recursive=True))


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path):
    """Every fused_concept module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fused_concept"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fused_concept"))
    return found


def test_training_imports_have_no_cycle_and_the_library_never_imports_training():
    modules = {_module_name(p): p for p in _sources(PACKAGE)}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    library = [name for name in modules if not name.startswith("fused_concept.training")]
    lazy = {"fused_concept", "fused_concept.__main__"}  # the lazy attribute and the command-line entry
    assert not [(name, sorted(m for m in graph[name] if m.startswith("fused_concept.training")))
                for name in library if name not in lazy and any(m.startswith("fused_concept.training")
                                                                for m in graph[name])]
    training = {name for name in modules if name.startswith("fused_concept.training")}

    def reaches(start, goal, seen):
        for nxt in graph[start] & training:
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = [name for name in training if reaches(name, name, set())]
    assert not cycles, cycles


def test_no_test_file_imports_another():
    offenders = []
    for path in glob.glob(os.path.join(TESTS, "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [(os.path.relpath(path, TESTS), n) for n in names
                          if any(part.startswith("test_") or part == "conftest" for part in n.split("."))]
    assert not offenders, offenders


# ----------------------------------------------------------------------------- recipes


_PAPER = {  # the paper's settings as they were written in code before they became recipes/paper.toml
    "lam": 0.5, "margin": 0.6, "top_k": 100, "max_synonyms": 10, "threshold": 0.75, "tagging": "paper",
    "pos_check": True, "seq_len": 256, "bos": True, "batch_size": 16, "epochs": 5, "lr": 7e-5, "weight_decay": 0.05,
    "warmup_ratio": 0.08, "min_lr_ratio": 0.0, "grad_clip": 1.0, "seed": 42, "lora": True, "lora_r": 4,
    "lora_alpha": 4, "lora_dropout": 0.2, "load_in_4bit": True,
}


def test_paper_recipe_file_holds_the_papers_settings():
    from fused_concept.training import recipes
    from fused_concept.training.config import PAPER_SETTINGS, TrainConfig

    assert os.path.isfile(os.path.join(TRAINING, "recipes", "paper.toml"))
    assert PAPER_SETTINGS == _PAPER and list(PAPER_SETTINGS) == list(_PAPER)
    assert all(type(PAPER_SETTINGS[k]) is type(v) for k, v in _PAPER.items())  # metrics.json records them as is
    assert recipes.names() == ["default", "medium", "paper"]
    assert recipes.apply(TrainConfig, "paper", lr=1.0).lr == 1.0
    assert "Llama-3.2-1B" in recipes.PAPER_SCALE
    setup_py = open(os.path.join(os.path.dirname(PACKAGE), "setup.py")).read()
    assert '"fused_concept.training.recipes": ["*.toml"]' in setup_py  # pip install ships the files


def test_bad_recipes_name_the_problem(tmp_path):
    from fused_concept.training import recipes
    from fused_concept.training.config import TrainConfig

    (tmp_path / "bad.toml").write_text("[settings]\nlearning_rate = 0.01\n")
    with pytest.raises(recipes.RecipeError, match="unknown setting.*learning_rate"):
        recipes.settings(TrainConfig, str(tmp_path / "bad.toml"))
    (tmp_path / "broken.toml").write_text("[settings\n")
    with pytest.raises(recipes.RecipeError, match="is not valid TOML"):
        recipes.read(str(tmp_path / "broken.toml"))
    with pytest.raises(recipes.RecipeError, match="unknown recipe"):
        recipes.read("nope")


# ----------------------------------------------------------------------------- the metrics registry

_NAMES = [  # metrics.json names before the registry existed: they must not change
    "heldout.perplexity", "heldout.content_perplexity", "heldout.noncontent_perplexity", "heldout.concept_mass",
    "heldout.concept_accuracy", "heldout.token_accuracy", "heldout.tokens", "heldout.content_tokens",
    "word_similarity.simlex999.spearman", "word_similarity.simlex999.pairs", "word_similarity.simlex999.coverage",
    "word_similarity.wordsim353.spearman", "word_similarity.wordsim353.pairs", "word_similarity.wordsim353.coverage",
]


def test_registry_keeps_the_metrics_json_names():
    assert [m.name for m in registry.METRICS] == _NAMES
    assert all(m.better in ("lower", "higher", None) for m in registry.METRICS)
    assert all((m.compute is None) == (m.computed_by != "heldout") for m in registry.METRICS)
    shown = [m.name for m in registry.shown()]
    assert len(shown) == 8 and "heldout.tokens" not in shown


def test_adding_a_metric_is_one_entry(monkeypatch, tmp_path, capsys):
    """One new entry in METRICS (held-out NLL per content token, lower is better), and nothing else changed,
    reaches a real (tiny) sweep end to end: evaluation, the before / after table, the summary line,
    metrics.json, curves.png, and the sweep's table, sweep.json and plot."""
    import matplotlib.pyplot as plt

    from fused_concept.training import report, sweep
    from helpers.tiny import small_config, tiny_data, tiny_model

    extra = registry.Metric("heldout.content_nll", "content-word NLL", "{:.4f}", "lower",
                            lambda s: s["ce_content"] / s["content"], short="content NLL", curve=("ce", float))
    monkeypatch.setattr(registry, "METRICS", registry.METRICS + (extra,))  # the one change
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep every figure a report draws, to read it back

    sums = torch.tensor([10.0, 20.0, 4.0, 12.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    assert registry.metrics_from_sums(sums)["heldout.content_nll"] == 3.0
    config = small_config(tmp_path, steps=1, lora=False, plot=True, word_similarity=False)
    summary = sweep.sweep(config, [0.0, 0.5], str(tmp_path / "sweep"), model=tiny_model(), data=tiny_data())

    out = capsys.readouterr().out
    run = json.loads((tmp_path / "sweep" / "lam-0.5" / "metrics.json").read_text())
    nll = run["after"]["heldout.content_nll"]
    assert nll == pytest.approx(math.log(run["after"]["heldout.content_perplexity"]), rel=1e-9)  # evaluation
    assert "heldout.content_nll" in run["before"]  # metrics.json, both evaluations
    assert re.search(r"^content-word NLL +\d+\.\d{4} +\d+\.\d{4} +[-+]\d", out, re.M)  # the table
    assert "content NLL " in out  # the summary line printed before training
    assert summary["runs"]["0.5"]["after"]["heldout.content_nll"] == nll  # sweep.json
    assert "content-word NLL" in (tmp_path / "sweep" / "sweep.md").read_text().splitlines()[0]
    curves = [fig for fig in figures if fig._suptitle.get_text().startswith("concept objective")]
    legends = [t.get_text() for fig in curves for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]
    assert len(curves) == 2 and "held-out content-word NLL, before / after" in legends  # curves.png
    sweep_plot = [fig for fig in figures if fig not in curves]
    assert "content-word NLL" in [ax.get_ylabel() for fig in sweep_plot for ax in fig.axes]  # sweep.png


def test_every_plot_axis_is_labelled_from_the_registry(monkeypatch, tmp_path):
    """curves.png: each panel's y axis is its training record's label (`TRAINING_RECORDS`); sweep.png:
    each panel's y axis is its metric's label."""
    import matplotlib.pyplot as plt

    from fused_concept.training import report, sweep

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    before = registry.metrics_from_sums(torch.tensor([10.0, 20.0, 4.0, 12.0, 2.0, 1.0, 3.0], dtype=torch.float64))
    history = [{"step": 1, "loss": 2.0, "ce": 1.9, "mass": 0.2, "lr": 1e-3, "grad_norm": 1.0}]
    report.plot_curves(str(tmp_path / "curves.png"), history, before, before, "t")
    (curves,) = figures
    assert [ax.get_ylabel() for ax in curves.axes] == [label for _, label in registry.TRAINING_RECORDS.values()]
    assert all(ax.get_xlabel() == "optimizer step" for ax in curves.axes)
    summary = {"command": "c", "twin": 0.0, "before": before,
               "runs": {"0": {"after": before, "diff_vs_twin": {}}, "0.5": {"after": before, "diff_vs_twin": {}}}}
    sweep.plot(summary, str(tmp_path / "sweep.png"))
    labels = [ax.get_ylabel() for ax in figures[1].axes if ax.get_visible()]
    assert labels == [m.label for m in registry.shown()] and all(labels)
