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
from benchmarks._measure import accuracy_case, matmul_peak, measure_case, run_case_in_child
from benchmarks._report import (SCHEMA, machine_info, markdown_report, now_utc, plot_sweeps,
                                versions)


def _find(cases, impl, k, head="trainable", group="headline", label=None):
    for c in cases:
        if (c["group"] == group and c["impl"] == impl and c["k"] == k and c.get("head", "trainable") == head
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


def _checks(fast, k):
    """(text, numerator, denominator, field, limit, unit key) of the headline ratios; numerator and
    denominator as (impl, K, head)."""
    t, f = "trainable", "frozen"
    checks = [
        (f"K={k}: {fast} / reference time", (fast, k, t), ("reference", k, t), "fwd_bwd", 1.1, "median_s"),
        (f"K={k}: {fast} / reference transient memory", (fast, k, t), ("reference", k, t),
         "mem_fwd_bwd_transient_mib", 1 / 8, None),
        (f"K={k}: {fast} / naive time", (fast, k, t), ("naive", k, t), "fwd_bwd", None, "median_s"),
        (f"K={k}: {fast} / naive transient memory", (fast, k, t), ("naive", k, t), "mem_fwd_bwd_transient_mib",
         1 / 8, None),
        (f"K=0: {fast} / torch_lce_chunked time", (fast, 0, t), ("torch_lce_chunked", 0, t), "fwd_bwd", 1.0,
         "median_s"),
        (f"K=0: {fast} / torch_lce_chunked transient memory", (fast, 0, t), ("torch_lce_chunked", 0, t),
         "mem_fwd_bwd_transient_mib", 1.0, None),
        (f"K=0: {fast} / naive time", (fast, 0, t), ("naive", 0, t), "fwd_bwd", None, "median_s"),
        # the floor: the same three products in 512-row chunks, measured in this run
        (f"K=0: {fast} / gemm_floor time", (fast, 0, t), ("gemm_floor", 0, t), "fwd_bwd", 1.1, "median_s"),
        (f"K={k}: {fast} / gemm_floor time", (fast, k, t), ("gemm_floor", 0, t), "fwd_bwd", 1.1, "median_s"),
        (f"K={k}: triton / torch time", ("triton", k, t), ("torch", k, t), "fwd_bwd", None, "median_s"),
        ("K=0: triton / torch time", ("triton", 0, t), ("torch", 0, t), "fwd_bwd", None, "median_s"),
        (f"K={k}, frozen head: triton / torch time", ("triton", k, f), ("torch", k, f), "fwd_bwd", None,
         "median_s"),
        ("K=0: triton / triton_filter_off time", ("triton", 0, t), ("triton_filter_off", 0, t), "fwd_bwd", None,
         "median_s"),
        # Triton's strategy "rows" against the torch path (what impl="auto" is), the default Triton strategy
        (f"K={k}: triton_rows / torch time", ("triton_rows", k, t), ("torch", k, t), "fwd_bwd", None, "median_s"),
        ("K=0: triton_rows / torch time", ("triton_rows", 0, t), ("torch", 0, t), "fwd_bwd", None, "median_s"),
        (f"K={k}, frozen head: triton_rows / torch time", ("triton_rows", k, f), ("torch", k, f), "fwd_bwd", None,
         "median_s"),
        (f"K={k}: triton_rows / triton time", ("triton_rows", k, t), ("triton", k, t), "fwd_bwd", None, "median_s"),
        (f"K={k}: triton_rows / torch transient memory", ("triton_rows", k, t), ("torch", k, t),
         "mem_fwd_bwd_transient_mib", None, None),
        (f"K={k}: auto / torch time", ("auto", k, t), ("torch", k, t), "fwd_bwd", None, "median_s"),
    ]
    for peer in ("liger", "cce"):
        checks.append((f"K=0: {fast} / {peer} time", (fast, 0, t), (peer, 0, t), "fwd_bwd", None, "median_s"))
        checks.append((f"K=0: {fast} / {peer} transient memory", (fast, 0, t), (peer, 0, t),
                       "mem_fwd_bwd_transient_mib", None, None))
    return checks


def headline_summary(cases):
    """The acceptance ratios at each headline shape (forward+backward medians); a ratio between
    implementations not both in the plan is left out, one whose case is missing or failed reads n/a."""
    lines, ratios = [], {}
    labels = []
    for c in cases:
        if c["group"] == "headline" and c.get("label") not in labels:
            labels.append(c.get("label"))
    for label in labels:
        mine = [c for c in cases if c["group"] == "headline" and c.get("label") == label]
        any_case = mine[0]
        planned = {c["impl"] for c in mine}
        cap = "" if any_case.get("softcap") is None else f", softcap {any_case['softcap']:g}"
        lines.append(f"{label} (N={any_case['n']}, D={any_case['d']}, V={any_case['v']}, "
                     f"{any_case['dtype']}{cap}, {any_case['device']}), forward+backward, median of "
                     f"{any_case['repeats']}:")
        fast = next(impl for impl in ("triton_rows", "triton", "torch") if impl in planned or impl == "torch")
        for text, num, den, field, limit, key in _checks(fast, _plans.HEADLINE_K):
            if num[0] not in planned or den[0] not in planned:
                continue
            line, ratio = _ratio_line("  " + text, _find(cases, *num, label=label), _find(cases, *den, label=label),
                                      field, limit, key)
            lines.append(line)
            ratios[f"{label}: {text}"] = ratio
        lines += [_case_line(c) for c in mine if c["status"] == "ok"]
    return lines, ratios


def _case_line(c):
    head = "" if c.get("head", "trainable") == "trainable" else " frozen"
    executed = c.get("tflops_fwd_bwd_executed")
    return (f"    {c['impl']:<18} K={c['k']:<2}{head:<7} fwd+bwd {c['fwd_bwd']['median_s'] * 1e3:9.1f} ms"
            f" [{c['fwd_bwd']['min_s'] * 1e3:.1f}-{c['fwd_bwd']['max_s'] * 1e3:.1f}]"
            f"  transient {_fmt_mib(c['mem_fwd_bwd_transient_mib'])}"
            f"  {c['tflops_fwd_bwd']:.3f} TFLOP/s useful"
            + ("" if executed is None else f", {executed:.3f} executed"))


def _write_json(path, report):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def _fmt_mib(x):
    return "   n/a" if x is None else f"{x:8.1f} MiB"


def _matmul_peak(args):
    """The device's matrix-product rate in this run (bf16 8192^3 on CUDA; a small float32 product on
    the CPU, as a plumbing check for the dry run)."""
    if args.device == "cuda":
        return matmul_peak("cuda", torch.bfloat16, 8192)
    return matmul_peak("cpu", torch.float32, 256 if args.plan == "dry" else 2048, repeats=3)


def _chunk_micro(args):
    """The per-chunk pieces of Triton's strategy "rows" (benchmarks/chunk_micro.py) on CUDA and in the dry
    run (the interpreter); None elsewhere; an error is recorded, not raised."""
    from benchmarks import chunk_micro

    if args.device != "cuda" and args.plan != "dry":
        return None
    t0 = time.perf_counter()
    try:
        result = chunk_micro.run(args.device, dry=args.plan == "dry")
    except Exception as exc:  # recorded, never dropped
        result = {"status": "error", "note": f"{type(exc).__name__}: {str(exc)[:300]}"}
    else:
        print("\n".join(chunk_micro.lines(result)), flush=True)
        result["status"] = "ok"
    result["wall_s"] = time.perf_counter() - t0
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--quick", action="store_true",
                   help="fewer points and repeats (CPU: under 5 minutes on 2 cores)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--plan", choices=("default", "dry"), default="default",
                   help="'dry': the GPU suite's cases at tiny shapes (gpu_suite.sh --dry-run: CPU, the "
                        "Triton cases in Triton's interpreter)")
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


def _new_report(args, argv):
    """The report's header (machine, versions, settings, the matmul rate, which implementations can run)."""
    report = {
        "schema": SCHEMA,
        "date": now_utc(),
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in argv),
        "machine": machine_info(args.device),
        "versions": versions(),
        "settings": {"quick": args.quick, "plan": args.plan, "device": args.device,
                     "cpu_memory": "fresh forkserver child per case; VmHWM reset per repeat",
                     "flops_fwd_bwd": "useful: 6*N*D*V (4*N*D*V for a frozen head); executed: per "
                                      "implementation, see each case's flops_executed_how",
                     "flops_fwd": "2*N*D*V"},
        "matmul_peak": _matmul_peak(args),
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

    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    if args.plan == "dry":
        cases, checks = _plans.dry_plan(args.device), _plans.accuracy_plan(args.device, dry=True)
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

    report = _new_report(args, argv)
    json_path = os.path.join(args.out, "results.json")
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        if args.time_budget is not None and t0 - started > args.time_budget:
            result = dict(case, status="skipped",
                          note=f"time budget of {args.time_budget:.0f} s spent")
        elif IMPLEMENTATIONS[case["impl"]].unavailable_reason(args.device, case.get("softcap")) is not None:
            result = dict(case, status="skipped",
                          note=IMPLEMENTATIONS[case["impl"]].unavailable_reason(args.device, case.get("softcap")))
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
              f"D={case['d']} V={case['v']} K={case['k']} {case['dtype']} {case.get('head', 'trainable')}"
              f"{'' if case.get('softcap') is None else ' softcap ' + str(case['softcap'])}: {result['status']} "
              f"{extra} ({time.perf_counter() - t0:.1f} s)", flush=True)
        _write_json(json_path, dict(report, partial=True, wall_time_s=time.perf_counter() - started))

    report["chunk_micro"] = _chunk_micro(args)
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
