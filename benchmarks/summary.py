"""Print a short table of a runner's results: ``python -m benchmarks.summary DIR/results.json``.

One line per headline case (forward+backward median, TFLOP/s of the useful 6*N*D*V (4*N*D*V frozen)
and of the FLOPs executed, transient and peak memory), then the headline ratios; the float64 error
checks that failed, if any."""
from __future__ import annotations

import json
import sys


def short_table(report):
    peak = report.get("matmul_peak")
    lines = [f"{report['date']}  {report['machine'].get('gpu') or report['machine']['cpu_model']}"
             f"  torch {report['versions']['torch']}  triton {report['versions']['triton']}"
             + ("" if not peak else f"  matmul {peak['tflops']:.1f} TFLOP/s ({peak['dtype']})")
             + ("  (PARTIAL: run did not finish)" if report.get("partial") else ""),
             f"{'shape':<14}{'impl':<19}{'K':>3} {'head':<9}{'fwd+bwd ms':>11}{'TFLOP/s':>9}{'executed':>9}"
             f"{'transient':>10}{'peak MiB':>10}  status"]
    for c in report["cases"]:
        if c["group"] != "headline":
            continue
        head = c.get("head", "trainable")
        if c["status"] == "ok":
            fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
            lines.append(f"{str(c.get('label')):<14}{c['impl']:<19}{c['k']:>3} {head:<9}"
                         f"{c['fwd_bwd']['median_s'] * 1e3:>11.1f}{c['tflops_fwd_bwd']:>9.2f}"
                         f"{fmt(c.get('tflops_fwd_bwd_executed'), '.2f'):>9}"
                         f"{fmt(c.get('mem_fwd_bwd_transient_mib'), '.0f'):>10}"
                         f"{fmt(c.get('mem_fwd_bwd_peak_mib'), '.0f'):>10}  ok")
        else:
            lines.append(f"{str(c.get('label')):<14}{c['impl']:<19}{c['k']:>3} {head:<9}{'-':>11}{'-':>9}"
                         f"{'-':>9}{'-':>10}{'-':>10}  {c['status']}: {c.get('note', '')[:60]}")
    lines += report.get("headline_summary") or []
    micro = report.get("chunk_micro")
    if micro and micro.get("status") == "ok":
        from benchmarks.chunk_micro import lines as micro_lines

        lines += micro_lines(micro)
    elif micro:
        lines.append(f"chunk micro-benchmark: {micro.get('status')}: {micro.get('note', '')[:100]}")
    bad = [a for a in report.get("accuracy", []) if a["status"] == "error"]
    for a in bad:
        lines.append(f"accuracy check failed to run: {a['impl']} K={a['k']} {a['dtype']}: "
                     f"{a.get('note', '')[:80]}")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.summary DIR/results.json")
    with open(argv[0]) as f:
        print("\n".join(short_table(json.load(f))))


if __name__ == "__main__":
    main()
