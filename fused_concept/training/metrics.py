"""The metrics registry: every number a run reports, once. Evaluation, metrics.json, the before / after
table, the one-line summary, curves.png, and the sweep's table, plot and bootstrap intervals all read
`METRICS`; adding a metric is one `Metric` entry (plus one `SUMS` entry when it needs a new sum).

Held-out metrics come from additive sums over the predicted positions (rows), so batches and ranks
combine by adding them. With valid rows V (target not ``ignore_index``), content rows T (valid rows whose
concept row lists at least one id: ``fused_concept.content_rows``) and the fused per-row statistics
``ce_i``, ``mass_i``, ``argmax_i``:

- global perplexity      ``exp( sum_{i in V} ce_i / |V| )``
- content perplexity     ``exp( sum_{i in T} ce_i / |T| )`` (the paper's eval_ntp_content_words.py: exp of the
                         mean gold NLL pooled over all content positions of all sequences)
- non-content perplexity ``exp( sum_{i in V - T} ce_i / |V - T| )`` (their ``--non-target`` complement)
- mean concept mass      ``sum_{i in T} mass_i / |T|``, mass_i = probability of the set S_i (gold included)
- concept accuracy       ``|{i in T : argmax_i in S_i}| / |T|``
- token accuracy         ``|{i in V : argmax_i = y_i}| / |V|``

NaN where a metric is undefined (no rows to average). Word-similarity metrics are filled by
``word_similarity.word_similarity`` (`computed_by` "word_similarity"); evaluation checks that it fills
exactly the registered names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch


class Rows(NamedTuple):
    """Per-row quantities of one batch of predicted positions, [N] each (what `SUMS` add up)."""

    valid: torch.Tensor  # bool: the target counts
    content: torch.Tensor  # bool: a content row (valid, with a concept set)
    ce: torch.Tensor  # float64: gold NLL
    mass: torch.Tensor  # float64: probability of the concept set, gold included
    token_hit: torch.Tensor  # bool: valid and argmax is the gold token
    concept_hit: torch.Tensor  # bool: argmax is the gold token or a listed concept id


# the additive sums, in the order of the float64 vector `metric_sums` returns
SUMS: Dict[str, Callable[[Rows], torch.Tensor]] = {
    "valid": lambda r: r.valid.sum(),
    "ce_valid": lambda r: r.ce[r.valid].sum(),
    "content": lambda r: r.content.sum(),
    "ce_content": lambda r: r.ce[r.content].sum(),
    "mass_content": lambda r: r.mass[r.content].sum(),
    "concept_hits": lambda r: (r.concept_hit & r.content).sum(),
    "token_hits": lambda r: r.token_hit.sum(),
}
SUM_FIELDS = tuple(SUMS)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def _exp_ratio(num: float, den: float) -> float:
    return math.exp(num / den) if den > 0 else float("nan")


@dataclass(frozen=True)
class Metric:
    """One reported number. `name`: its metrics.json key (data set, then statistic); `label`: how tables
    and plots name it; `fmt`: how they print it; `better`: "lower" or "higher" is better (None: a count);
    `compute`: its value from the summed `SUMS` (a dict by name), or None when `computed_by` fills it;
    `short`: its label in the one-line summary (None: not there); `shown`: in the tables and plots;
    `bootstrap_rows`: "all", "content" or "noncontent" for a perplexity whose sweep difference gets a
    paired bootstrap interval over those rows; `curve`: (training record, transform) it is drawn
    against on curves.png, before and after training."""

    name: str
    label: str
    fmt: str
    better: Optional[str]
    compute: Optional[Callable[[Dict[str, float]], float]] = None
    computed_by: str = "heldout"
    short: Optional[str] = None
    shown: bool = True
    bootstrap_rows: Optional[str] = None
    curve: Optional[Tuple[str, Callable[[float], float]]] = None


def _word_similarity(name: str, label: str):
    return (
        Metric(f"word_similarity.{name}.spearman", f"{label} Spearman", "{:.4f}", "higher",
               computed_by="word_similarity", short=f"{label} rho"),
        Metric(f"word_similarity.{name}.pairs", f"{label} pairs used", "{:d}", None,
               computed_by="word_similarity", shown=False),
        Metric(f"word_similarity.{name}.coverage", f"{label} coverage", "{:.4f}", None,
               computed_by="word_similarity", shown=False),
    )


METRICS: Tuple[Metric, ...] = (
    Metric("heldout.perplexity", "perplexity", "{:.3f}", "lower",
           lambda s: _exp_ratio(s["ce_valid"], s["valid"]), short="ppl", bootstrap_rows="all",
           curve=("ce", math.log)),
    Metric("heldout.content_perplexity", "content-word perplexity", "{:.3f}", "lower",
           lambda s: _exp_ratio(s["ce_content"], s["content"]), short="content ppl", bootstrap_rows="content"),
    Metric("heldout.noncontent_perplexity", "non-content perplexity", "{:.3f}", "lower",
           lambda s: _exp_ratio(s["ce_valid"] - s["ce_content"], s["valid"] - s["content"]),
           bootstrap_rows="noncontent"),
    Metric("heldout.concept_mass", "concept mass", "{:.4f}", "higher",
           lambda s: _ratio(s["mass_content"], s["content"]), short="concept mass", curve=("mass", float)),
    Metric("heldout.concept_accuracy", "concept accuracy", "{:.4f}", "higher",
           lambda s: _ratio(s["concept_hits"], s["content"])),
    Metric("heldout.token_accuracy", "token accuracy", "{:.4f}", "higher",
           lambda s: _ratio(s["token_hits"], s["valid"])),
    Metric("heldout.tokens", "held-out positions", "{:d}", None, lambda s: int(s["valid"]), shown=False),
    Metric("heldout.content_tokens", "held-out content positions", "{:d}", None, lambda s: int(s["content"]),
           shown=False),
    *_word_similarity("simlex999", "SimLex-999"),
    *_word_similarity("wordsim353", "WordSim-353"),
)
# Views of METRICS, computed when asked, so that METRICS stays the one list (a test adds an entry to it alone).


def by_name(name: str) -> Optional[Metric]:
    """The registered metric `name` (None when there is none)."""
    return next((m for m in METRICS if m.name == name), None)


def shown() -> Tuple[Metric, ...]:
    """The metrics the tables and plots show, in registry order."""
    return tuple(m for m in METRICS if m.shown)


def metrics_from_sums(sums: torch.Tensor) -> Dict[str, float]:
    """Every held-out metric from summed `SUMS` (a float64 vector in `SUM_FIELDS` order)."""
    s = dict(zip(SUM_FIELDS, sums.tolist()))
    return {m.name: m.compute(s) for m in METRICS if m.computed_by == "heldout"}


def computed_by(source: str) -> Tuple[str, ...]:
    """The names of the metrics that `source` ("heldout", "word_similarity") fills."""
    return tuple(m.name for m in METRICS if m.computed_by == source)


def formatted(metric: Metric, value) -> str:
    """`value` in the metric's format; "n/a" when missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return metric.fmt.format(int(value) if metric.fmt == "{:d}" else value)


def verdict(metric: Metric, before: float, after: float) -> str:
    """"better", "worse" or "same" for a change from `before` to `after` (empty for a count)."""
    if metric.better is None or any(isinstance(v, float) and math.isnan(v) for v in (before, after)):
        return ""
    if after == before:
        return "same"
    return "better" if (after < before) == (metric.better == "lower") else "worse"


# what each training step records (metrics.json "history"), as curves.png draws it: (title, y-axis label)
TRAINING_RECORDS: Dict[str, Tuple[str, str]] = {
    "loss": ("training objective", "objective (nats per row)"),
    "ce": ("training cross-entropy", "cross-entropy (nats per token)"),
    "mass": ("training concept mass", "concept-set probability"),
}
