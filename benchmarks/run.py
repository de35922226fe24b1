"""Benchmark runner: ``python -m benchmarks.run --device cpu|cuda [--quick] --out DIR``.

Sweeps tokens N, vocabulary V, concept size K and dtype over every implementation of
``benchmarks._impls`` and writes, into DIR: ``results.json`` (machine, versions, command,
date, every case), ``results.md`` (tables) and ``time_memory_vs_N.png`` /
``time_memory_vs_V.png``. On the CPU each case runs in a fresh child process (its peak RSS is
the case's); on CUDA in this process with the allocator's peak statistics. The last thing
printed is the headline comparison. Method: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

from benchmarks import _plans
from benchmarks._impls import IMPLEMENTATIONS
from benchmarks._measure import accuracy_case, measure_case, run_case_in_child
from benchmarks._report import (SCHEMA, machine_info, markdown_report, now_utc, plot_sweeps,
                                versions)


def _find(cases, impl, k, group="headline", label=None):
    for c in cases:
        if (c["group"] == group and c["impl"] == impl and c["k"] == k
                and (label is None or c.get("label") == label) and c["status"] == "ok"):
            return c
    return None


def _ratio_line(text, num, den, field, limit, unit_key):
    if num is None or den is None:
        missing = "numerator" if num is None else "denominator"
        return f"{text}: n/a ({missing} case missing or failed)", None
    a = num[field] if unit_key is None else num[field][unit_key]
    b = den[field] if unit_key is None else den[field][unit_key]
    if a is None or b is None:
        return f"{text}: n/a (not measured)", None
    ratio = a / b if b > 0 else (1.0 if a <= 0 else float("inf"))
    verdict = "" if limit is None else ("  PASS" if ratio <= limit else "  FAIL")
    bound = "" if limit is None else f" (target <= {limit:g}x)"
    return f"{text}: {ratio:.3f}x{bound}{verdict}", ratio


def headline_summary(cases):
    """The acceptance ratios at each headline shape (forward+backward medians)."""
    lines, ratios = [], {}
    labels = []
    for c in cases:
        if c["group"] == "headline" and c.get("label") not in labels:
            labels.append(c.get("label"))
    for label in labels:
        any_case = next(c for c in cases if c["group"] == "headline" and c.get("label") == label)
        k = _plans.HEADLINE_K
        lines.append(f"{label} (N={any_case['n']}, D={any_case['d']}, V={any_case['v']}, "
                     f"{any_case['dtype']}, {any_case['device']}), forward+backward, median of "
                     f"{any_case['repeats']}:")
        fast = "triton" if any_case["device"] == "cuda" else "torch"
        pick = lambda impl, kk: _find(cases, impl, kk, label=label)  # noqa: E731
        checks = [
            (f"  K={k}: {fast} / reference time", pick(fast, k), pick("reference", k),
             "fwd_bwd", 1.1, "median_s"),
            (f"  K={k}: {fast} / reference transient memory", pick(fast, k),
             pick("reference", k), "mem_fwd_bwd_transient_mib", 1 / 8, None),
            (f"  K={k}: {fast} / naive time", pick(fast, k), pick("naive", k),
             "fwd_bwd", None, "median_s"),
            (f"  K={k}: {fast} / naive transient memory", pick(fast, k), pick("naive", k),
             "mem_fwd_bwd_transient_mib", 1 / 8, None),
            (f"  K=0: {fast} / torch_lce_chunked time", pick(fast, 0),
             pick("torch_lce_chunked", 0), "fwd_bwd", 1.0, "median_s"),
            (f"  K=0: {fast} / torch_lce_chunked transient memory", pick(fast, 0),
             pick("torch_lce_chunked", 0), "mem_fwd_bwd_transient_mib", 1.0, None),
            (f"  K=0: {fast} / naive time", pick(fast, 0), pick("naive", 0),
             "fwd_bwd", None, "median_s"),
        ]
        for peer in ("liger", "cce"):
            if pick(peer, 0) is not None:
                checks.append((f"  K=0: {fast} / {peer} time", pick(fast, 0), pick(peer, 0),
                               "fwd_bwd", None, "median_s"))
                checks.append((f"  K=0: {fast} / {peer} transient memory", pick(fast, 0),
                               pick(peer, 0), "mem_fwd_bwd_transient_mib", None, None))
        for text, num, den, field, limit, key in checks:
            line, ratio = _ratio_line(text, num, den, field, limit, key)
            lines.append(line)
            ratios[f"{label}: {text.strip()}"] = ratio
        for impl in (fast, "reference", "naive", "torch_lce_chunked"):
            for kk in (k, 0):
                c = pick(impl, kk)
                if c is not None:
                    lines.append(
                        f"    {impl:<18} K={kk:<2} fwd+bwd {c['fwd_bwd']['median_s'] * 1e3:9.1f} ms"
                        f" [{c['fwd_bwd']['min_s'] * 1e3:.1f}-{c['fwd_bwd']['max_s'] * 1e3:.1f}]"
                        f"  transient {_fmt_mib(c['mem_fwd_bwd_transient_mib'])}"
                        f"  {c['tflops_fwd_bwd']:.3f} TFLOP/s")
    return lines, ratios


def _write_json(path, report):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def _fmt_mib(x):
    return "   n/a" if x is None else f"{x:8.1f} MiB"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--quick", action="store_true",
                   help="fewer points and repeats (CPU: under 5 minutes on 2 cores)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--plan", choices=("default", "smoke"), default="default",
                   help="'smoke': tiny shapes, for the runner's own test")
    p.add_argument("--only", default=None,
                   help="comma-separated groups to run (headline,sweep_n,sweep_v,sweep_k,"
                        "sweep_dtype); default all")
    p.add_argument("--impls", default=None,
                   help="comma-separated implementations to run (default all): "
                        + ",".join(IMPLEMENTATIONS))
    p.add_argument("--case-timeout", type=float, default=1200.0,
                   help="seconds before a CPU case's child is killed (recorded as timeout)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new case is started (the rest are recorded "
                        "as skipped); the JSON is rewritten after every case")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    if args.plan == "smoke":
        cases, checks = _plans.smoke_plan(args.device), _plans.accuracy_plan(args.device, True)
    else:
        plan = _plans.cpu_plan if args.device == "cpu" else _plans.cuda_plan
        cases, checks = plan(args.quick), _plans.accuracy_plan(args.device)
    if args.only:
        groups = set(args.only.split(","))
        cases = [c for c in cases if c["group"] in groups]
    if args.impls:
        names = set(args.impls.split(","))
        unknown = names - set(IMPLEMENTATIONS)
        if unknown:
            raise SystemExit(f"--impls: unknown implementation(s) {sorted(unknown)}; "
                             f"known: {', '.join(IMPLEMENTATIONS)}")
        cases = [c for c in cases if c["impl"] in names]
        checks = [c for c in checks if c["impl"] in names]

    report = {
        "schema": SCHEMA,
        "date": now_utc(),
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in argv),
        "machine": machine_info(args.device),
        "versions": versions(),
        "settings": {"quick": args.quick, "plan": args.plan, "device": args.device,
                     "cpu_memory": "fresh forkserver child per case; VmHWM reset per repeat",
                     "flops_fwd_bwd": "6*N*D*V", "flops_fwd": "2*N*D*V"},
        "implementations": {},
        "cases": [],
        "accuracy": [],
    }
    for name, impl in IMPLEMENTATIONS.items():
        reason = impl.unavailable_reason(args.device)
        report["implementations"][name] = {"description": impl.description,
                                           "available": reason is None, "note": reason}
        if reason is not None:
            print(f"[bench] {name}: skipped ({reason})", flush=True)

    json_path = os.path.join(args.out, "results.json")
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        if args.time_budget is not None and t0 - started > args.time_budget:
            result = dict(case, status="skipped",
                          note=f"time budget of {args.time_budget:.0f} s spent")
        elif IMPLEMENTATIONS[case["impl"]].unavailable_reason(args.device) is not None:
            result = dict(case, status="skipped",
                          note=IMPLEMENTATIONS[case["impl"]].unavailable_reason(args.device))
        elif args.device == "cpu":
            result = run_case_in_child(case, args.case_timeout)
        else:
            result = measure_case(case)
            torch.cuda.empty_cache()
        report["cases"].append(result)
        extra = ""
        if result["status"] == "ok":
            extra = (f"fwd {result['fwd']['median_s'] * 1e3:.1f} ms, fwd+bwd "
                     f"{result['fwd_bwd']['median_s'] * 1e3:.1f} ms, transient "
                     f"{_fmt_mib(result['mem_fwd_bwd_transient_mib']).strip()}")
        else:
            extra = result.get("note", "")
        print(f"[bench {i + 1}/{len(cases)}] {case['group']} {case['impl']} N={case['n']} "
              f"D={case['d']} V={case['v']} K={case['k']} {case['dtype']}: {result['status']} "
              f"{extra} ({time.perf_counter() - t0:.1f} s)", flush=True)
        _write_json(json_path, dict(report, partial=True, wall_time_s=time.perf_counter() - started))

    for check in checks:
        report["accuracy"].append(accuracy_case(check))

    report["headline_summary"], report["headline_ratios"] = headline_summary(report["cases"])
    report["wall_time_s"] = time.perf_counter() - started
    report["plots"] = [] if args.no_plots else [
        os.path.basename(p) for p in plot_sweeps(report, args.out)]
    report["partial"] = False
    _write_json(json_path, report)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown_report(report))
    print("\n".join(report["headline_summary"]))
    print(f"[bench] wrote {args.out}/results.json, results.md; wall time "
          f"{report['wall_time_s']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
