"""Paired bootstrap 95% intervals for the difference of a perplexity between two runs on the same rows.

As the paper's conceptlib/eval_utils.py (paired_bootstrap_cis): each of ``resamples`` (1000) iterations
draws the row indices with replacement ONCE (seed 42) and uses that same draw for both runs; the
statistic is ``exp(mean NLL of run) - exp(mean NLL of twin)`` on the drawn rows; the interval is the
2.5th and 97.5th percentile of the draws. Rows are predicted positions (the paper's examples).
"""

from __future__ import annotations

from typing import Sequence, Tuple

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
