"""The training zone's shape: short functions, imports that point one way, recipes as files shipped with the
package, and ONE metrics registry that every report reads (adding a metric is one entry)."""
import ast
import dataclasses
import glob
import math
import os

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


def test_every_training_function_fits_80_lines():
    long = []
    for path in _sources(TRAINING) + [os.path.join(PACKAGE, "__main__.py")]:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > 80:
                    long.append(f"{os.path.relpath(path, PACKAGE)}:{node.name} ({node.end_lineno - start + 1} lines)")
    assert not long, long


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
    assert recipes.names() == ["default", "paper"]
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
    shown = [m.name for m in registry.SHOWN]
    assert len(shown) == 8 and "heldout.tokens" not in shown


def test_adding_a_metric_is_one_entry(monkeypatch, tmp_path):
    """One new entry (held-out NLL per content token, lower is better) reaches evaluation, the table, the
    summary line, curves.png and the sweep's table and plot, with nothing else changed."""
    from fused_concept.training import report, sweep

    extra = registry.Metric("heldout.content_nll", "content-word NLL", "{:.4f}", "lower",
                            lambda s: s["ce_content"] / s["content"], short="content NLL", curve=("ce", float))
    metrics = registry.METRICS + (extra,)
    monkeypatch.setattr(registry, "METRICS", metrics)
    monkeypatch.setattr(registry, "BY_NAME", {m.name: m for m in metrics})
    monkeypatch.setattr(registry, "HELDOUT", tuple(m for m in metrics if m.computed_by == "heldout"))
    monkeypatch.setattr(registry, "SHOWN", tuple(m for m in metrics if m.shown))
    sums = torch.tensor([10.0, 20.0, 4.0, 12.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    before = registry.metrics_from_sums(sums)
    after = registry.metrics_from_sums(sums * torch.tensor([1, 0.5, 1, 0.5, 1, 1, 1], dtype=torch.float64))
    assert before["heldout.content_nll"] == 3.0 and after["heldout.content_nll"] == 1.5
    assert before["heldout.perplexity"] == pytest.approx(math.exp(2.0))
    assert "content-word NLL" in report.format_table(before, after).splitlines()[-1]
    assert report.format_table(before, after).splitlines()[-1].endswith("better")
    assert "content NLL 3.0000" in report.summary(before)
    history = [{"step": 1, "loss": 2.0, "ce": 1.9, "mass": 0.2, "lr": 1e-3, "grad_norm": 1.0}]
    report.plot_curves(str(tmp_path / "curves.png"), history, before, after, "t")
    summary = {"command": "c", "twin": 0.0, "before": before,
               "runs": {"0": {"after": after, "diff_vs_twin": {}}, "0.5": {"after": before, "diff_vs_twin": {}}}}
    table = sweep.format_table(summary)
    assert "content-word NLL" in table.splitlines()[0] and "| 0.5 |" in table
    sweep.plot(summary, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000
