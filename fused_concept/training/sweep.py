"""`python -m fused_concept sweep --lam 0 0.25 0.5 0.75 1`: the paper's ablation over lambda.

Each lambda trains with the same configuration otherwise (same data, concept sets, seed, steps), from a
fresh copy of the same loaded model (full precision: ``--load-in-4bit`` is turned off, and recorded so),
into ``out_dir/lam-<lam>``; the concept sets are built once and
read back from the shared cache by the later runs. With ``--seeds S1,S2,...`` every lambda trains once per
seed (the seed of LoRA init, dropout and data order) into ``out_dir/seed-S/lam-<lam>``, and lambda = 0 of
the same seed is each run's twin. Then one table (``sweep.md``, ``sweep.json``) and one plot
(``sweep.png``) of every shown metric of the registry (``metrics.py``) against lambda (the mean over
seeds, each seed's value, their spread), with 95% intervals (``bootstrap.py``) of each run's perplexities
minus its twin's: a paired bootstrap over held-out rows for one seed, a hierarchical one (seeds, then
rows within each seed) for several; each seed's difference from its twin; and the per-word view
(``per_word.py``) of each lambda > 0.
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
    return summarize(config, lams, out_dir, seeds=seeds, seconds=time.time() - t_start, tokenizer=tokenizer)


def summarize(config, lams: Sequence[float], out_dir: str, *, seeds: Optional[Sequence[int]] = None,
              seconds=None, tokenizer=None) -> Dict:
    """The table, plot and sweep.json of runs already in ``out_dir/lam-<lam>`` (``out_dir/seed-S/lam-<lam>``
    with `seeds`): what `sweep` does after training them; also usable on runs trained separately with the
    same options. `tokenizer` names the words of the per-word view (token ids without it)."""
    from fused_concept.training.per_word import word_changes

    keys = list(seeds) if seeds else [None]
    runs, rows = {}, {}
    for seed in keys:
        for lam in lams:
            with open(os.path.join(run_dir(out_dir, lam, seed), "metrics.json")) as handle:
                runs[seed, lam] = json.load(handle)
            rows[seed, lam] = _rows(run_dir(out_dir, lam, seed))
    twin = 0.0 if 0.0 in lams else lams[0]
    summary = {
        "command": "python -m fused_concept sweep --lam " + " ".join(f"{lam:g}" for lam in lams)
        + ("" if not seeds else " --seeds " + ",".join(str(s) for s in seeds)),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("lam", "out_dir", "seed")},
        "seeds": list(seeds) if seeds else [config.seed],
        "twin": twin,
        "before": runs[keys[0], lams[0]]["before"],
        "runs": {f"{lam:g}": _run_summary([runs[s, lam] for s in keys], [rows[s, lam] for s in keys],
                                          [rows[s, twin] for s in keys], multi=len(keys) > 1) for lam in lams},
        "per_word": {f"{lam:g}": word_changes([rows[s, lam] for s in keys], [rows[s, twin] for s in keys],
                                              tokenizer) for lam in lams if lam != twin and "target" in rows[keys[0], lam]},
        "seconds": None if seconds is None else round(seconds, 1),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(out_dir, "sweep.md"), "w") as handle:
        handle.write(format_report(summary) + "\n")
    plot(summary, os.path.join(out_dir, "sweep.png"))
    print(format_table(summary), flush=True)
    return summary


def _rows(folder: str) -> Dict:
    with open(os.path.join(folder, "heldout_rows.json")) as handle:
        return json.load(handle)["after"]


def _mean(values: List[float]) -> float:
    return sum(values) / len(values)


def _run_summary(results: List[Dict], mine: List[Dict], theirs: List[Dict], *, multi: bool) -> Dict:
    """One lambda over its seeds (paired with the twin's runs of the same seeds): the mean of each
    after-training metric (and each seed's, with several seeds), and for each perplexity with
    `bootstrap_rows` the difference from the twin with its hierarchical bootstrap interval
    (`bootstrap.hierarchical_bootstrap_ppl_diff`; one seed: the paired bootstrap)."""
    from fused_concept.training.bootstrap import hierarchical_bootstrap_ppl_diff

    for a, b in zip(mine, theirs):
        if a["content"] != b["content"]:
            raise ValueError("the runs of a sweep must share held-out rows and content positions")
    names = [n for n in results[0]["after"] if all(isinstance(r["after"].get(n), (int, float)) for r in results)]
    out = {"after": {n: _mean([r["after"][n] for r in results]) for n in names}, "diff_vs_twin": {},
           "seconds": round(sum(r["seconds"]["total"] for r in results), 2)}
    if multi:
        out["per_seed"] = [r["after"] for r in results]
    for metric in registry.METRICS:
        if metric.bootstrap_rows is None:
            continue
        keep = ROW_SELECTORS[metric.bootstrap_rows]
        pairs = [([x for x, c in zip(a["nll"], a["content"]) if keep(c)],
                  [x for x, c in zip(b["nll"], b["content"]) if keep(c)]) for a, b in zip(mine, theirs)]
        diff, low, high, per_seed = hierarchical_bootstrap_ppl_diff(pairs)
        out["diff_vs_twin"][metric.name] = {"diff": diff, "ci95": [low, high],
                                            **({"per_seed": per_seed} if multi else {})}
    return out


def _sd(values: List[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def format_table(summary: Dict) -> str:
    """Markdown: one row per lambda, one column per shown metric (the mean over seeds, and with several
    seeds their standard deviation); perplexities with their difference from the twin and its 95% interval
    (paired bootstrap over rows; with seeds, hierarchical: seeds, then rows)."""
    shown = registry.shown()
    lines = ["| lam | " + " | ".join(m.label for m in shown) + " |", "|" + "---|" * (len(shown) + 1)]
    lines.append("| before | " + " | ".join(registry.formatted(m, summary["before"].get(m.name)) for m in shown)
                 + " |")
    for lam, run in summary["runs"].items():
        cells = []
        for m in shown:
            cell = registry.formatted(m, run["after"].get(m.name))
            if "per_seed" in run and all(m.name in r for r in run["per_seed"]):
                cell += f" ±{_sd([r[m.name] for r in run['per_seed']]):.{_decimals(m)}f}"
            if m.name in run["diff_vs_twin"] and float(lam) != summary["twin"]:
                d = run["diff_vs_twin"][m.name]
                cell += f" ({d['diff']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}])"
            cells.append(cell)
        lines.append(f"| {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _decimals(metric) -> int:
    return 4 if "4" in metric.fmt else 2


def format_seed_table(summary: Dict) -> str:
    """Markdown: each seed's difference from its own lam = 0 twin, per lambda and shown metric (the spread
    across seeds that the intervals include); empty with one seed."""
    runs, twin = summary["runs"], summary["runs"][f"{summary['twin']:g}"]
    if "per_seed" not in twin:
        return ""
    shown = [m for m in registry.shown() if all(m.name in r for r in twin["per_seed"])]
    lines = ["Each seed's difference from its lam = 0 twin (seeds " + ", ".join(str(s) for s in summary["seeds"])
             + " in order):", "", "| lam | " + " | ".join(m.label for m in shown) + " |",
             "|" + "---|" * (len(shown) + 1)]
    for lam, run in runs.items():
        if float(lam) == summary["twin"]:
            continue
        cells = [" / ".join(f"{r[m.name] - t[m.name]:+.{_decimals(m)}f}" for r, t in zip(run["per_seed"],
                                                                                     twin["per_seed"]))
                 for m in shown]
        lines.append(f"| {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(summary: Dict) -> str:
    """sweep.md: the table, the per-seed differences, and the per-word view of each lambda > 0."""
    from fused_concept.training.per_word import format_word_table

    parts = [format_table(summary), f"`{summary['command']}` (seeds {', '.join(str(s) for s in summary['seeds'])}). "
             "Cells: mean over seeds (± their standard deviation); perplexities of lam > 0 add the difference "
             "from lam = 0 and its 95% interval (" + ("hierarchical bootstrap: seeds, then held-out rows, "
             "paired by seed" if len(summary["seeds"]) > 1 else "paired bootstrap over held-out rows") + ")."]
    parts += [format_seed_table(summary)] if len(summary["seeds"]) > 1 else []
    parts += [format_word_table(lam, view) for lam, view in summary.get("per_word", {}).items()]
    return "\n\n".join(parts)


def plot(summary: Dict, path: str) -> None:
    """One panel per shown metric against lambda; dashed: before training; bars on perplexities: the 95%
    interval of the difference from the twin, drawn around each point; small dots: each seed's value."""
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
                    label="after training" + (" (mean of seeds)" if len(summary.get("seeds", [])) > 1 else ""))
        _seed_dots(ax, summary, m.name, lams)
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


def _seed_dots(ax, summary: Dict, name: str, lams: List[float]) -> None:
    """Each seed's value of metric `name` at each lambda (nothing with one seed)."""
    xs, ys = [], []
    for lam, run in zip(lams, summary["runs"].values()):
        for after in run.get("per_seed", []):
            if name in after:
                xs.append(lam)
                ys.append(after[name])
    if xs:
        ax.scatter(xs, ys, s=12, color="C1", alpha=0.7, zorder=3, label="each seed")


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
