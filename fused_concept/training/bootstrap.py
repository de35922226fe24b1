"""Paired bootstrap 95% intervals for the difference of a perplexity between two runs on the same rows.

As the paper's conceptlib/eval_utils.py (paired_bootstrap_cis): each of ``resamples`` (1000) iterations
draws the row indices with replacement ONCE (seed 42) and uses that same draw for both runs; the
statistic is ``exp(mean NLL of run) - exp(mean NLL of twin)`` on the drawn rows; the interval is the
2.5th and 97.5th percentile of the draws. Rows are predicted positions (the paper's examples).
Several seeds: `hierarchical_bootstrap_ppl_diff` resamples the seeds, then the rows within each.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def paired_bootstrap_ppl_diff(nll_run: Sequence[float], nll_twin: Sequence[float], *, resamples: int = 1000,
                              level: float = 0.95, seed: int = 42) -> Tuple[float, float, float]:
    """(difference on all rows, lower, upper) of ``ppl(run) - ppl(twin)``; NaNs when there are no rows."""
    run = torch.as_tensor(nll_run, dtype=torch.float64)
    twin = torch.as_tensor(nll_twin, dtype=torch.float64)
    if run.shape != twin.shape:
        raise ValueError(f"paired rows differ: {tuple(run.shape)} vs {tuple(twin.shape)}")
    if run.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, run.numel(), (resamples, run.numel()), generator=generator)
    diffs = run[draws].mean(dim=1).exp() - twin[draws].mean(dim=1).exp()
    tail = (1 - level) / 2
    low, high = torch.quantile(diffs, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(run.mean().exp() - twin.mean().exp()), low, high


def hierarchical_bootstrap_ppl_diff(pairs: Sequence[Tuple[Sequence[float], Sequence[float]]], *,
                                    resamples: int = 1000, level: float = 0.95,
                                    seed: int = 42) -> Tuple[float, float, float, List[float]]:
    """(mean over seeds of the difference, lower, upper, per-seed differences) of ``ppl(run) - ppl(twin)``
    for runs trained with several seeds: ``pairs`` holds, per seed, (run's row NLLs, its lam = 0 twin's of
    the same seed), paired by row. Two stages per resample: draw the seeds with replacement, then for
    each drawn seed (each slot anew) the rows with replacement, the same draw for the run and its twin;
    the statistic is the mean over the drawn slots of ``exp(mean NLL run) - exp(mean NLL twin)``, so the
    interval holds both the row noise within a seed and the spread across seeds. With one seed no seed is
    drawn and this is `paired_bootstrap_ppl_diff` exactly (same draws)."""
    runs = [torch.as_tensor(a, dtype=torch.float64) for a, _ in pairs]
    twins = [torch.as_tensor(b, dtype=torch.float64) for _, b in pairs]
    if not runs:
        raise ValueError("no seeds to bootstrap")
    for run, twin in zip(runs, twins):
        if run.shape != twin.shape:
            raise ValueError(f"paired rows differ: {tuple(run.shape)} vs {tuple(twin.shape)}")
    per_seed = [float(r.mean().exp() - t.mean().exp()) if r.numel() else float("nan") for r, t in zip(runs, twins)]
    if any(r.numel() == 0 for r in runs):
        return float("nan"), float("nan"), float("nan"), per_seed
    count = len(runs)
    generator = torch.Generator().manual_seed(seed)
    picks = (torch.zeros(resamples, 1, dtype=torch.long) if count == 1
             else torch.randint(0, count, (resamples, count), generator=generator))
    total = torch.zeros(resamples, dtype=torch.float64)
    for slot in range(picks.shape[1]):
        for index, (run, twin) in enumerate(zip(runs, twins)):
            draws = torch.randint(0, run.numel(), (resamples, run.numel()), generator=generator)
            diffs = run[draws].mean(dim=1).exp() - twin[draws].mean(dim=1).exp()
            total += torch.where(picks[:, slot] == index, diffs, torch.zeros_like(diffs))
    stats = total / picks.shape[1]
    tail = (1 - level) / 2
    low, high = torch.quantile(stats, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return sum(per_seed) / count, low, high, per_seed
