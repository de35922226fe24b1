"""What a training or evaluation run prints and writes: the job description, metrics.json (atomically), the
before / after table, the one-line summary, and the training curves. Every metric's label, format and
direction come from the registry (``metrics.py``)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional

from fused_concept.training import metrics as registry
from fused_concept.training.config import DEFAULT_MODEL_NAME, TrainConfig
from fused_concept.training.data import DEFAULT_CORPUS_NAME, TokenData, corpus_fingerprint
from fused_concept.training.durable import write_atomic
from fused_concept.training.recipes import PAPER_SCALE, PAPER_SETTINGS, departures


def write_json(path: str, payload) -> None:
    data = json.dumps(payload, indent=2).encode("utf-8")
    write_atomic(path, lambda h: h.write(data), sole_writer=True)


def model_description(config: TrainConfig) -> str:
    """The base model as the user named it: --model, or the embedded default's name."""
    return config.model or DEFAULT_MODEL_NAME


def settings_vs_paper(config: TrainConfig) -> str:
    diffs = departures(config)
    return "settings that differ from the paper: " + (", ".join(diffs) if diffs else "none")


def content_words_method(config: TrainConfig, text: Optional[str]) -> str:
    if text is None:
        return "given token data"
    from fused_concept.training.concepts import method

    return f"{method()}; tagging={config.tagging}"


def describe_job(config: TrainConfig, data: TokenData, rows: int, num_content: int, *, is_default_job: bool) -> None:
    """The job's data (`rows` predicted training positions, `num_content` of them content words), its
    scale and its departures from the paper, printed once by rank 0 before training."""
    from fused_concept.training.run import log

    log(f"data: {data.train_ids.shape[0]} train / {data.heldout_ids.shape[0]} held-out sequences of "
        f"{data.train_ids.shape[1]} tokens; {num_content}/{rows} training rows are content words")
    if is_default_job:
        log(f"embedded default job, scaled down to finish in minutes on 2 CPU cores: {config.num_train} training "
            f"sequences of {config.seq_len} tokens, {config.steps} steps of {config.batch_size} sequences; "
            + PAPER_SCALE)
    log(settings_vs_paper(config))


def summary(metrics: Dict) -> str:
    """One line: the registry's metrics that have a `short` label and a value."""
    return ", ".join(f"{m.short} {registry.formatted(m, metrics[m.name])}" for m in registry.METRICS
                     if m.short is not None and m.name in metrics)


def format_table(before: Dict, after: Dict) -> str:
    """The before / after table of the registry's shown metrics, with the change and whether it is better."""
    lines = [f"{'metric':<26}{'before':>12}{'after':>12}{'change':>12}"]
    for m in registry.shown():
        if m.name in before and m.name in after:
            b, a = before[m.name], after[m.name]
            lines.append(f"{m.label:<26}{registry.formatted(m, b):>12}{registry.formatted(m, a):>12}{(a - b):>+12.4f}"
                         f"  {registry.verdict(m, b, a)}".rstrip())
    return "\n".join(lines)


def print_metrics(metrics: Dict) -> None:
    """Every metric of an evaluation, one per line, in the registry's order and formats."""
    for name, value in metrics.items():
        metric = registry.by_name(name)
        shown = registry.formatted(metric, value) if metric is not None else f"{value:.4f}"
        print(f"{name:<40}{shown:>12}", flush=True)


def result(config, run, data: TokenData, text: Optional[str], state, after: Dict, seconds: Dict) -> Dict:
    """What metrics.json holds for a training run."""
    is_default_job = config.model is None and config.data is None and text is not None
    return {
        "config": dataclasses.asdict(config),
        "paper_settings": PAPER_SETTINGS,
        "notes": settings_vs_paper(config)
        + ("; embedded default job (scaled down to fit 2 CPU cores)" if is_default_job else ""),
        "content_words": content_words_method(config, text),
        "data": {
            "corpus": (config.data or DEFAULT_CORPUS_NAME) if text is not None else "given token data",
            "fingerprint": corpus_fingerprint(text) if text is not None else None,
            "train_sequences": int(data.train_ids.shape[0]),
            "heldout_sequences": int(data.heldout_ids.shape[0]),
            "seq_len": int(data.train_ids.shape[1]),
        },
        "world_size": run.world,
        "device": str(run.device),
        "autocast": None if run.autocast_dtype is None else str(run.autocast_dtype).removeprefix("torch."),
        "before": state.before,
        "after": after,
        "history": state.history,
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
    }


def write_outputs(config: TrainConfig, outcome: Dict, rows: Optional[Dict] = None) -> None:
    """metrics.json (atomically), heldout_rows.json (per-row NLL, for bootstrap intervals), curves.png,
    and the before / after table on stdout."""
    os.makedirs(config.out_dir, exist_ok=True)
    write_json(os.path.join(config.out_dir, "metrics.json"), outcome)
    if rows and all(part.get("nll") for part in rows.values()):
        write_json(os.path.join(config.out_dir, "heldout_rows.json"), rows)
    if config.plot:
        plot_curves(os.path.join(config.out_dir, "curves.png"), outcome["history"], outcome["before"],
                    outcome["after"], f"concept objective, lam={config.lam}, margin={config.margin}")
    print(format_table(outcome["before"], outcome["after"]), flush=True)
    print(f"wrote {config.out_dir}/metrics.json" + (" and curves.png" if config.plot else "")
          + f" in {outcome['seconds']['total']:.0f} s", flush=True)


def plot_curves(path: str, history: List[Dict], before: Dict, after: Dict, title: str) -> None:
    """One panel per training record (`registry.TRAINING_RECORDS`) against the optimizer step, with the
    held-out metrics drawn against that record (`Metric.curve`) before and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    records = registry.TRAINING_RECORDS
    fig, axes = plt.subplots(1, len(records), figsize=(14, 4))
    for ax, (key, (panel_title, y_label)) in zip(axes, records.items()):
        ax.plot(steps, [h[key] for h in history], label="train (per step)")
        for m in registry.METRICS:
            if m.curve is not None and m.curve[0] == key and m.name in before and m.name in after:
                transform = m.curve[1]
                ax.scatter([0, steps[-1] if steps else 1], [transform(before[m.name]), transform(after[m.name])],
                           color="C3", zorder=3, label=f"held-out {m.label}, before / after"
                           + ("" if transform is float else f" ({transform.__name__})"))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(y_label)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda h: fig.savefig(h, format="png", dpi=110), sole_writer=True)
    plt.close(fig)
