"""The sweep's per-word view: which content words gained or lost the most probability under lam > 0.

For each content row (held-out position whose concept set lists an id) of a run and of its lam = 0 twin
of the same seed (same rows), the change in gold log-probability is ``nll(twin) - nll(run)`` (positive: the
run gives the gold token more probability). Rows are grouped by their gold token id (the token the
content word's concept set sits on) over every seed; a word type's entry is the mean change, its
occurrences per seed (`count`) and its synonyms (concept-set size minus the gold token). The top gains
and losses are among the types seen at least `min_count` times per seed. `by_synonyms` splits all
content rows into those whose set lists synonyms and those whose set is the gold token alone.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence


def word_changes(run_rows: Sequence[Dict], twin_rows: Sequence[Dict], tokenizer=None, *, top: int = 10,
                 min_count: int = 2) -> Dict:
    """The per-word view of one lambda: `run_rows` / `twin_rows` are heldout_rows.json "after" parts, one
    per seed (paired); returns ``{"gains", "losses", "by_synonyms", "min_count", "seeds"}``."""
    sums: Dict[int, List[float]] = {}  # id -> [sum of changes, rows, sum of synonyms]
    split = {"with synonyms": [0.0, 0], "gold only": [0.0, 0]}
    for mine, theirs in zip(run_rows, twin_rows):
        if "target" not in mine or mine["target"] != theirs["target"] or mine["content"] != theirs["content"]:
            raise ValueError("per-word view: the runs must share held-out rows and record their gold ids")
        for nll, base, content, target, size in zip(mine["nll"], theirs["nll"], mine["content"], mine["target"],
                                                   mine["set_size"]):
            if not content:
                continue
            entry = sums.setdefault(target, [0.0, 0, 0.0])
            entry[0] += base - nll
            entry[1] += 1
            entry[2] += size - 1
            part = split["with synonyms" if size > 1 else "gold only"]
            part[0] += base - nll
            part[1] += 1
    seeds = max(1, len(run_rows))
    words = [{"id": target, "word": _word(tokenizer, target), "mean_change": total / rows,
              "count": rows / seeds, "synonyms": synonyms / rows}
             for target, (total, rows, synonyms) in sums.items() if rows / seeds >= min_count]
    words.sort(key=lambda w: w["mean_change"])
    return {"gains": words[::-1][:top], "losses": words[:top], "min_count": min_count, "seeds": seeds,
            "by_synonyms": {name: {"mean_change": total / rows if rows else float("nan"), "rows": rows / seeds}
                            for name, (total, rows) in split.items()}}


def _word(tokenizer, target: int) -> str:
    if tokenizer is None:
        return f"<{target}>"
    return tokenizer.decode([target]).strip() or repr(tokenizer.decode([target]))


def format_word_table(lam: str, view: Dict) -> str:
    """Markdown: the top gains and losses of lambda `lam` side by side, then the split by synonyms."""
    lines = [f"Per-word change in gold log-probability, lam {lam} vs lam 0 (same seed, same held-out rows; mean "
             f"over {view['seeds']} seed(s); word types seen at least {view['min_count']} times):", "",
             "| rank | gain: word | change | count | synonyms | loss: word | change | count | synonyms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rank in range(max(len(view["gains"]), len(view["losses"]))):
        cells = []
        for side in ("gains", "losses"):
            w: Optional[Dict] = view[side][rank] if rank < len(view[side]) else None
            cells += (["", "", "", ""] if w is None else
                      [f"`{w['word']}`", f"{w['mean_change']:+.3f}", f"{w['count']:g}", f"{w['synonyms']:.1f}"])
        lines.append(f"| {rank + 1} | " + " | ".join(cells) + " |")
    split = view["by_synonyms"]
    lines += ["", "All content rows: " + "; ".join(f"{name}: mean change {part['mean_change']:+.4f} nats over "
                                                  f"{part['rows']:g} rows" for name, part in split.items())]
    return "\n".join(lines)
