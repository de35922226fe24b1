"""`python -m fused_concept sweep --lam 0 0.25 0.5 0.75 1`: the paper's ablation over lambda.

Each lambda trains with the same configuration otherwise (same data, concept sets, seed, steps), from a
fresh copy of the same loaded model (full precision: ``--load-in-4bit`` is turned off, and recorded so),
into ``out_dir/lam-<lam>``; the concept sets are built once and
read back from the shared cache by the later runs. Then one table (``sweep.md``, ``sweep.json``) and one
plot (``sweep.png``) of every shown metric of the registry (``metrics.py``) against lambda, with paired
bootstrap 95% intervals (``bootstrap.py``) of each run's perplexities minus its lambda = 0 twin's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from typing import Dict, List, Optional, Sequence

from fused_concept.training import metrics as registry
from fused_concept.training.config import ConfigError, resolve_schedule, validate

# which held-out rows a perplexity's bootstrap interval resamples (Metric.bootstrap_rows)
ROW_SELECTORS = {"all": lambda content: True, "content": lambda content: content,
                 "noncontent": lambda content: not content}


def check_lams(lams: Sequence[float]) -> None:
    """--lam values for a sweep: at least one, each in [0, 1], all different."""
    if not lams:
        raise ConfigError("lam", list(lams), "give at least one value")
    for lam in lams:
        if not isinstance(lam, (int, float)) or not math.isfinite(lam) or not 0.0 <= lam <= 1.0:
            raise ConfigError("lam", lam, "must be in [0, 1]")
    if len(set(lams)) != len(lams):
        raise ConfigError("lam", list(lams), "the values must differ")


def parse_seeds(text: str) -> List[int]:
    """--seeds as typed: comma-separated integers >= 0, all different (``"1,2,3"``)."""
    try:
        seeds = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise ConfigError("seeds", text, "must be comma-separated integers, e.g. 1,2,3") from None
    check_seeds(seeds, shown=text)
    return seeds


def check_seeds(seeds: Optional[Sequence[int]], *, shown=None) -> None:
    """Seeds for a sweep (None: the config's one seed): at least one, each an integer >= 0, all different."""
    if seeds is None:
        return
    shown = ",".join(str(s) for s in seeds) if shown is None else shown
    if not seeds:
        raise ConfigError("seeds", shown, "give at least one seed")
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError("seeds", shown, "each seed must be an integer >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", shown, "the seeds must differ")


def run_dir(out_dir: str, lam: float, seed: Optional[int] = None) -> str:
    """A sweep run's folder: ``out_dir/lam-<lam>``, or ``out_dir/seed-<seed>/lam-<lam>`` under --seeds."""
    return os.path.join(out_dir, *([] if seed is None else [f"seed-{seed}"]), f"lam-{lam:g}")


def sweep(config, lams: Sequence[float], out_dir: str, *, seeds: Optional[Sequence[int]] = None, model=None,
          tokenizer=None, data=None) -> Dict:
    """Train one run per lambda (per seed, with `seeds`: see the module docstring); returns what sweep.json
    holds. `model`, `tokenizer` and `data` replace the loaded ones, as in `train` (tests pass tiny ones)."""
    from fused_concept.training.checkpoints import resume_point
    from fused_concept.training.loop import train
    from fused_concept.training.run import load_named_model, log

    check_lams(lams)
    check_seeds(seeds)
    if config.load_in_4bit:  # the runs train copies of one model loaded here, never a 4-bit one: record that
        log("load_in_4bit: a sweep loads the base model once, in full precision, and trains a copy per lambda")
        config = dataclasses.replace(config, load_in_4bit=False)
    configs = {(seed, lam): dataclasses.replace(config, lam=lam, seed=config.seed if seed is None else seed,
                                                out_dir=run_dir(out_dir, lam, seed))
               for seed in (seeds or [None]) for lam in lams}
    for run_config in configs.values():  # every run's settings, and its checkpoint under --resume, first
        validate(run_config)
        resume_point(resolve_schedule(run_config))
    t_start = time.time()
    if model is None:
        model, tokenizer = load_named_model(config)
    before = None  # same model, same data: evaluated once (the seed only changes LoRA init and data order)
    for (seed, lam), run_config in configs.items():
        log(f"sweep: seed {run_config.seed}, lam {lam:g}")
        outcome = train(run_config, model=copy.deepcopy(model), tokenizer=tokenizer, data=data, before=before)
        before = outcome["before"]
    return summarize(config, lams, out_dir, seeds=seeds, seconds=time.time() - t_start)


def summarize(config, lams: Sequence[float], out_dir: str, *, seeds: Optional[Sequence[int]] = None,
              seconds=None) -> Dict:
    """The table, plot and sweep.json of runs already in ``out_dir/lam-<lam>`` (what `sweep` does after
    training them; also usable on runs trained separately with the same options)."""
    if seeds is not None:
        return {seed: summarize(config, lams, os.path.join(out_dir, f"seed-{seed}"), seconds=seconds)
                for seed in seeds}
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
    """The run's after-training metrics and, for each perplexity with `bootstrap_rows`, the paired
    bootstrap interval of the difference from the twin's on those rows."""
    from fused_concept.training.bootstrap import paired_bootstrap_ppl_diff

    mine, theirs = _rows(out_dir, lam), _rows(out_dir, twin)
    if mine["content"] != theirs["content"]:
        raise ValueError("the runs of a sweep must share held-out rows and content positions")
    intervals = {}
    for metric in registry.METRICS:
        if metric.bootstrap_rows is None:
            continue
        keep = ROW_SELECTORS[metric.bootstrap_rows]
        a = [x for x, c in zip(mine["nll"], mine["content"]) if keep(c)]
        b = [x for x, c in zip(theirs["nll"], theirs["content"]) if keep(c)]
        diff, low, high = paired_bootstrap_ppl_diff(a, b)
        intervals[metric.name] = {"diff": diff, "ci95": [low, high]}
    return {"after": result["after"], "diff_vs_twin": intervals, "seconds": result["seconds"]["total"]}


def format_table(summary: Dict) -> str:
    """Markdown: one row per lambda, one column per shown metric; perplexities with their difference from
    the twin and its paired bootstrap 95% interval."""
    shown = registry.shown()
    lines = ["| lam | " + " | ".join(m.label for m in shown) + " |", "|" + "---|" * (len(shown) + 1)]
    lines.append("| before | " + " | ".join(registry.formatted(m, summary["before"].get(m.name)) for m in shown)
                 + " |")
    for lam, run in summary["runs"].items():
        cells = []
        for m in shown:
            cell = registry.formatted(m, run["after"].get(m.name))
            if m.name in run["diff_vs_twin"] and float(lam) != summary["twin"]:
                d = run["diff_vs_twin"][m.name]
                cell += f" ({d['diff']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}])"
            cells.append(cell)
        lines.append(f"| {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: Dict, path: str) -> None:
    """One panel per shown metric against lambda; dashed: before training; bars on perplexities: the paired
    bootstrap 95% interval of the difference from the twin, drawn around each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams: List[float] = [float(k) for k in summary["runs"]]
    shown = registry.shown()
    columns = 4
    fig, axes = plt.subplots(math.ceil(len(shown) / columns), columns, figsize=(16, 3.5 * math.ceil(len(shown) / 4)),
                             squeeze=False)
    for ax, m in zip(axes.reshape(-1), shown):
        values = [summary["runs"][k]["after"].get(m.name, float("nan")) for k in summary["runs"]]
        ax.errorbar(lams, values, yerr=_error_bars(summary, m.name, values), marker="o", capsize=3,
                    label="after training")
        if m.name in summary["before"]:
            ax.axhline(summary["before"][m.name], color="gray", linestyle="--", label="before")
        ax.set_xlabel("lambda")
        ax.set_ylabel(m.label)
        ax.set_title(f"{m.label} ({m.better} is better)" if m.better else m.label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.reshape(-1)[len(shown):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(summary["command"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _error_bars(summary: Dict, name: str, values: List[float]):
    """[below, above] each point: the twin's value plus the bootstrap interval of the difference; None
    for a metric without intervals."""
    runs = summary["runs"]
    if name not in runs[next(iter(runs))]["diff_vs_twin"]:
        return None
    twin_value = runs[f"{summary['twin']:g}"]["after"][name]
    ci = [runs[k]["diff_vs_twin"][name]["ci95"] for k in runs]
    return [[max(0.0, v - (twin_value + lo)) for v, (lo, _) in zip(values, ci)],
            [max(0.0, (twin_value + hi) - v) for v, (_, hi) in zip(values, ci)]]
