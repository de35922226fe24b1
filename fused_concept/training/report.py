"""What a training or evaluation run writes and prints: metrics as JSON (atomically), the before / after
table, the one-line summary, and the training curves."""
from __future__ import annotations

import json
import math
from typing import Dict, List

from fused_concept.training.durable import write_atomic


def write_json(path: str, payload) -> None:
    data = json.dumps(payload, indent=2).encode("utf-8")
    write_atomic(path, lambda h: h.write(data), sole_writer=True)


def summary(metrics: Dict) -> str:
    text = (f"ppl {metrics['heldout.perplexity']:.2f}, content ppl {metrics['heldout.content_perplexity']:.2f}, "
            f"concept mass {metrics['heldout.concept_mass']:.4f}")
    if "word_similarity.simlex999.spearman" in metrics:
        text += (f", SimLex-999 rho {metrics['word_similarity.simlex999.spearman']:.4f}, "
                 f"WordSim-353 rho {metrics['word_similarity.wordsim353.spearman']:.4f}")
    return text


TABLE_ROWS = (
    ("perplexity", "heldout.perplexity", "{:.3f}"),
    ("content-word perplexity", "heldout.content_perplexity", "{:.3f}"),
    ("non-content perplexity", "heldout.noncontent_perplexity", "{:.3f}"),
    ("mean concept mass", "heldout.concept_mass", "{:.4f}"),
    ("concept accuracy", "heldout.concept_accuracy", "{:.4f}"),
    ("token accuracy", "heldout.token_accuracy", "{:.4f}"),
    ("SimLex-999 Spearman", "word_similarity.simlex999.spearman", "{:.4f}"),
    ("WordSim-353 Spearman", "word_similarity.wordsim353.spearman", "{:.4f}"),
)


def format_table(before: Dict, after: Dict) -> str:
    lines = [f"{'metric':<26}{'before':>12}{'after':>12}{'change':>12}"]
    for label, key, fmt in TABLE_ROWS:
        if key in before and key in after:
            b, a = before[key], after[key]
            lines.append(f"{label:<26}{fmt.format(b):>12}{fmt.format(a):>12}{(a - b):>+12.4f}")
    return "\n".join(lines)


def plot_curves(path: str, history: List[Dict], before: Dict, after: Dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        ("loss", "training objective", None),
        ("ce", "training CE (nats)", ("heldout.perplexity", math.log)),
        ("mass", "training concept mass", ("heldout.concept_mass", float)),
    ]
    for ax, (key, label, held) in zip(axes, panels):
        ax.plot(steps, [h[key] for h in history], label="train (per step)")
        if held is not None:
            metric, transform = held
            last = steps[-1] if steps else 1
            ax.scatter([0, last], [transform(before[metric]), transform(after[metric])], color="C3", zorder=3,
                       label="held-out before / after")
        ax.set_xlabel("optimizer step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda h: fig.savefig(h, format="png", dpi=110), sole_writer=True)
    plt.close(fig)
