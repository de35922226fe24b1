"""Run metadata (machine, versions), the Markdown report and the plots."""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import subprocess
import sys

import torch

SCHEMA = "fused-concept-bench/1"


def _version(module):
    try:
        mod = importlib.import_module(module)
    except Exception:
        return "not installed"
    return getattr(mod, "__version__", "installed (no __version__)")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return commit + ("+dirty" if dirty.strip() else "")
    except Exception:
        return "unknown"


def machine_info(device):
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        import psutil

        info["memory_total_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
        info["load_average_at_start"] = list(os.getloadavg())
    except Exception:
        pass
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def versions():
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "fused_concept_git": _git_commit(),
        "liger_kernel": _version("liger_kernel"),
        "cut_cross_entropy": _version("cut_cross_entropy"),
    }


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _ms(summary):
    if not summary:
        return "-"
    return (f"{summary['median_s'] * 1e3:.1f} "
            f"[{summary['min_s'] * 1e3:.1f}-{summary['max_s'] * 1e3:.1f}]")


def _mib(x):
    return "-" if x is None else f"{x:.0f}"


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown_report(report):
    m, ver = report["machine"], report["versions"]
    where = m.get("gpu") or f"{m['cpu_model']}, {m['cpu_affinity'] or m['cpu_count']} cores"
    lines = [
        f"# Concept-loss benchmark, {report['date']}",
        "",
        f"Machine: {where}; torch {ver['torch']}, triton {ver['triton']}, "
        f"commit {ver['fused_concept_git']}.  ",
        f"Command: `{report['command']}`; wall time {report['wall_time_s']:.0f} s.",
        "",
    ]
    peak = report.get("matmul_peak")
    if peak:
        lines += [f"Matrix-product rate of this device: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']} "
                  f"{peak['size']}^3 torch.mm, median of {len(peak['times_s'])}).", ""]
    if report.get("headline_summary"):
        lines += ["## Headline comparison", "", "```"] + report["headline_summary"] + ["```", ""]
    for plot in report.get("plots") or []:
        lines += [f"![{plot[:-4].replace('_', ' ')}]({plot})", ""]
    lines += [
        "## Cases",
        "",
        "Times in ms: median [min-max] over the repeats. fwd: forward under `torch.no_grad()`; "
        "fwd+bwd: loss and its backward into hidden (and weight, for a trainable head). TFLOP/s: "
        "useful work (6*N*D*V, 4*N*D*V for a frozen head) / time; executed: the FLOPs the implementation "
        "ran (recompute and skipped tiles counted as they happen; - where not known) / time. Memory in "
        "MiB: fwd peak above the inputs; fwd+bwd transient = peak minus inputs and gradients; peak = "
        "the allocator's absolute peak (CUDA).",
        "",
        "| group | impl | N | D | V | K | dtype | head | softcap | inputs | fwd ms | fwd+bwd ms | TFLOP/s | executed "
        "TFLOP/s | fwd peak MiB | fwd+bwd transient MiB | fwd+bwd peak MiB | status |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in report["cases"]:
        ok = c["status"] == "ok"
        status = "ok" if ok else f"{c['status']}: {c.get('note', '')}"
        lines.append(
            f"| {c['group']} | {c['impl']} | {c['n']} | {c['d']} | {c['v']} | {c['k']} "
            f"| {c['dtype']} | {c.get('head', 'trainable')} | {_num(c.get('softcap'), 'g')} "
            f"| {c.get('inputs', 'gaussian')} | {_ms(c.get('fwd'))} | {_ms(c.get('fwd_bwd'))} "
            f"| {_num(c.get('tflops_fwd_bwd'), '.3f')} | {_num(c.get('tflops_fwd_bwd_executed'), '.3f')} "
            f"| {_mib(c.get('mem_fwd_peak_above_inputs_mib'))} "
            f"| {_mib(c.get('mem_fwd_bwd_transient_mib'))} | {_mib(c.get('mem_fwd_bwd_peak_mib'))} | {status} |")
    lines += [
        "",
        "## Error against float64 (small shape)",
        "",
        "loss: |l - l64| / |l64|; d_hidden, d_weight: max|g - g64| / max|g64|.",
        "",
        "| impl | N | D | V | K | dtype | softcap | inputs | loss err | d_hidden err | d_weight err | status |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for a in report["accuracy"]:
        status = "ok" if a["status"] == "ok" else f"{a['status']}: {a.get('note', '')}"
        lines.append(
            f"| {a['impl']} | {a['n']} | {a['d']} | {a['v']} | {a['k']} | {a['dtype']} "
            f"| {_num(a.get('softcap'), 'g')} | {a.get('inputs', 'gaussian')} "
            f"| {_num(a.get('loss_rel_err'), '.1e')} | {_num(a.get('d_hidden_err'), '.1e')} "
            f"| {_num(a.get('d_weight_err'), '.1e')} | {status} |")
    micro = report.get("chunk_micro")
    if micro:
        from benchmarks.chunk_micro import lines as micro_lines

        lines += ["", "## Strategy rows: the pieces of one chunk", "", "```"]
        lines += micro_lines(micro) if micro.get("status") == "ok" else [f"{micro['status']}: {micro.get('note')}"]
        lines += ["```"]
    lines += ["", "## Implementations", ""]
    for name, impl in report["implementations"].items():
        note = "available" if impl["available"] else f"skipped: {impl['note']}"
        lines.append(f"- `{name}`: {impl['description']} ({note})")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def plot_sweeps(report, out_dir):
    """time and memory of fwd+bwd against N and against V; one PNG per axis. Points come
    from the sweep group of that axis plus the headline cases of the same D (and same K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cases = [c for c in report["cases"] if c["status"] == "ok" and c.get("head", "trainable") == "trainable"]
    for axis, group in (("n", "sweep_n"), ("v", "sweep_v")):
        sweep = [c for c in cases if c["group"] == group]
        if not sweep:
            continue
        fixed = {key: sweep[0][key] for key in ("d", "dtype")}
        other = "v" if axis == "n" else "n"
        fixed[other] = sweep[0][other]
        ks = {c["k"] for c in sweep}
        points = [c for c in cases if c["group"] in (group, "headline") and c["k"] in ks
                  and all(c[key] == val for key, val in fixed.items())]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl in sorted({c["impl"] for c in points}):
            for k in sorted({c["k"] for c in points if c["impl"] == impl}):
                pts = sorted((c[axis], c) for c in points if c["impl"] == impl and c["k"] == k)
                xs = [p[0] for p in pts]
                label = f"{impl} (K={k})"
                ax_t.plot(xs, [p[1]["fwd_bwd"]["median_s"] * 1e3 for p in pts], "o-", label=label)
                mem = [(x, p[1]["mem_fwd_bwd_transient_mib"]) for x, p in zip(xs, pts)
                       if p[1]["mem_fwd_bwd_transient_mib"] is not None]
                if mem:
                    ax_m.plot([x for x, _ in mem], [max(y, 0.5) for _, y in mem], "o-",
                              label=label)
        name = "N (tokens)" if axis == "n" else "V (vocabulary)"
        fixed_txt = ", ".join(f"{key.upper() if len(key) == 1 else key}={val}"
                              for key, val in fixed.items())
        for ax, ylabel in ((ax_t, "fwd+bwd time, ms (median)"),
                           (ax_m, "fwd+bwd transient memory, MiB (floor 0.5)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(name)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        m = report["machine"]
        where = m.get("gpu") or f"{m['cpu_model']}, {m['cpu_affinity'] or m['cpu_count']} cores"
        fig.suptitle(f"{report['date'][:10]}, {where}; {fixed_txt}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"time_memory_vs_{axis.upper()}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
