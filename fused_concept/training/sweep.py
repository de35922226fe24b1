"""`python -m fused_concept sweep --lam 0 0.25 0.5 0.75 1`: the paper's ablation over lambda.

Each lambda trains with the same configuration otherwise (same data, concept sets, seed, steps), from a
fresh copy of the same loaded model, into ``out_dir/lam-<lam>``; the concept sets are built once and
read back from the shared cache by the later runs. Then one table (``sweep.md``, ``sweep.json``) and one
plot (``sweep.png``) of every held-out and word-similarity metric against lambda, with paired bootstrap
95% intervals (``fused_concept._bootstrap``) of each run's perplexities minus its lambda = 0 twin's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from typing import Dict, List, Sequence

METRICS = (
    ("heldout.perplexity", "perplexity", None),
    ("heldout.content_perplexity", "content-word perplexity", True),
    ("heldout.noncontent_perplexity", "non-content perplexity", False),
    ("heldout.concept_mass", "concept mass", None),
    ("heldout.concept_accuracy", "concept accuracy", None),
    ("heldout.token_accuracy", "token accuracy", None),
    ("word_similarity.simlex999.spearman", "SimLex-999 Spearman", None),
    ("word_similarity.wordsim353.spearman", "WordSim-353 Spearman", None),
)


def sweep(config, lams: Sequence[float], out_dir: str, *, model=None, tokenizer=None, data=None) -> Dict:
    """Train one run per lambda (see the module docstring); returns what sweep.json holds. `model`,
    `tokenizer` and `data` replace the loaded ones, as in `train` (tests pass tiny ones)."""
    from fused_concept.integrations import hf as hf
    from fused_concept.training.loop import train

    if len(set(lams)) != len(lams):
        raise ValueError(f"--lam values must differ, got {list(lams)}")
    t_start = time.time()
    if model is None:
        model, tokenizer = hf.load_default_model() if config.model is None else hf.load_model(config.model)
    runs = {}
    for lam in lams:
        run_config = dataclasses.replace(config, lam=lam, out_dir=os.path.join(out_dir, f"lam-{lam:g}"))
        before = runs[lams[0]]["before"] if runs else None  # same model, same data: evaluated once
        runs[lam] = train(run_config, model=copy.deepcopy(model), tokenizer=tokenizer, data=data, before=before)
    return summarize(config, lams, out_dir, seconds=time.time() - t_start)


def summarize(config, lams: Sequence[float], out_dir: str, *, seconds=None) -> Dict:
    """The table, plot and sweep.json of runs already in ``out_dir/lam-<lam>`` (what `sweep` does after
    training them; also usable on runs trained separately with the same options)."""
    runs = {}
    for lam in lams:
        with open(os.path.join(out_dir, f"lam-{lam:g}", "metrics.json")) as handle:
            runs[lam] = json.load(handle)
    twin = 0.0 if 0.0 in runs else lams[0]
    summary = {
        "command": "python -m fused_concept sweep --lam " + " ".join(f"{lam:g}" for lam in lams),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("lam", "out_dir")},
        "twin": twin,
        "before": runs[lams[0]]["before"],
        "runs": {f"{lam:g}": _run_summary(runs[lam], out_dir, lam, twin) for lam in lams},
        "seconds": None if seconds is None else round(seconds, 1),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(out_dir, "sweep.md"), "w") as handle:
        handle.write(format_table(summary) + "\n")
    plot(summary, os.path.join(out_dir, "sweep.png"))
    print(format_table(summary), flush=True)
    return summary


def _rows(out_dir: str, lam: float) -> Dict:
    with open(os.path.join(out_dir, f"lam-{lam:g}", "heldout_rows.json")) as handle:
        return json.load(handle)["after"]


def _run_summary(result: Dict, out_dir: str, lam: float, twin: float) -> Dict:
    """The run's after-training metrics and, for its perplexities, the paired bootstrap interval of the
    difference from the twin's (content rows, non-content rows, all rows)."""
    from fused_concept.training.bootstrap import paired_bootstrap_ppl_diff

    mine, theirs = _rows(out_dir, lam), _rows(out_dir, twin)
    if mine["content"] != theirs["content"]:
        raise ValueError("the runs of a sweep must share held-out rows and content positions")
    pick = {"heldout.perplexity": lambda c: True, "heldout.content_perplexity": lambda c: c,
            "heldout.noncontent_perplexity": lambda c: not c}
    intervals = {}
    for key, keep in pick.items():
        a = [x for x, c in zip(mine["nll"], mine["content"]) if keep(c)]
        b = [x for x, c in zip(theirs["nll"], theirs["content"]) if keep(c)]
        diff, low, high = paired_bootstrap_ppl_diff(a, b)
        intervals[key] = {"diff": diff, "ci95": [low, high]}
    return {"after": result["after"], "diff_vs_twin": intervals, "seconds": result["seconds"]["total"]}


def format_table(summary: Dict) -> str:
    """Markdown: one row per lambda, one column per metric; perplexities with their difference from the
    twin and its paired bootstrap 95% interval."""
    header = "| lam | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    lines.append("| before | " + " | ".join(_fmt(summary["before"].get(key)) for key, _, _ in METRICS) + " |")
    for lam, run in summary["runs"].items():
        cells = []
        for key, _, _ in METRICS:
            cell = _fmt(run["after"].get(key))
            if key in run["diff_vs_twin"] and float(lam) != summary["twin"]:
                d = run["diff_vs_twin"][key]
                cell += f" ({d['diff']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}])"
            cells.append(cell)
        lines.append(f"| {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def plot(summary: Dict, path: str) -> None:
    """One panel per metric against lambda; dashed: before training; bars on perplexities: the paired
    bootstrap 95% interval of the difference from the twin, drawn around each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams: List[float] = [float(k) for k in summary["runs"]]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, label, _) in zip(axes.reshape(-1), METRICS):
        values = [summary["runs"][k]["after"].get(key, float("nan")) for k in summary["runs"]]
        errors = None
        if key in summary["runs"][next(iter(summary["runs"]))]["diff_vs_twin"]:
            twin_value = summary["runs"][f"{summary['twin']:g}"]["after"][key]
            ci = [summary["runs"][k]["diff_vs_twin"][key]["ci95"] for k in summary["runs"]]
            errors = [[max(0.0, v - (twin_value + lo)) for v, (lo, _) in zip(values, ci)],
                      [max(0.0, (twin_value + hi) - v) for v, (_, hi) in zip(values, ci)]]
        ax.errorbar(lams, values, yerr=errors, marker="o", capsize=3, label="after training")
        if key in summary["before"]:
            ax.axhline(summary["before"][key], color="gray", linestyle="--", label="before")
        ax.set_xlabel("lambda")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(summary["command"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
