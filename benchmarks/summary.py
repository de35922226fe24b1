"""Print a short table of a runner's results: ``python -m benchmarks.summary DIR/results.json``.

One line per headline case (forward+backward median, TFLOP/s counting 6*N*D*V, transient
memory), then the headline ratios; the float64 error checks that failed, if any."""
from __future__ import annotations

import json
import sys


def short_table(report):
    lines = [f"{report['date']}  {report['machine'].get('gpu') or report['machine']['cpu_model']}"
             f"  torch {report['versions']['torch']}"
             + ("  (PARTIAL: run did not finish)" if report.get("partial") else ""),
             f"{'shape':<14}{'impl':<19}{'K':>3}{'dtype':>10}{'fwd+bwd ms':>12}{'TFLOP/s':>9}"
             f"{'transient MiB':>15}  status"]
    for c in report["cases"]:
        if c["group"] != "headline":
            continue
        if c["status"] == "ok":
            mem = c.get("mem_fwd_bwd_transient_mib")
            lines.append(f"{str(c.get('label')):<14}{c['impl']:<19}{c['k']:>3}{c['dtype']:>10}"
                         f"{c['fwd_bwd']['median_s'] * 1e3:>12.1f}{c['tflops_fwd_bwd']:>9.2f}"
                         f"{'n/a' if mem is None else format(mem, '.0f'):>15}  ok")
        else:
            lines.append(f"{str(c.get('label')):<14}{c['impl']:<19}{c['k']:>3}{c['dtype']:>10}"
                         f"{'-':>12}{'-':>9}{'-':>15}  {c['status']}: {c.get('note', '')[:60]}")
    lines += report.get("headline_summary") or []
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
