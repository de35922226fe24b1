"""Sanity of the benchmark plumbing at tiny shapes, through `benchmarks/gpu_suite.sh --dry-run`: the GPU
suite's whole path on the CPU (its test step, the runner with the suite's cases in child processes,
the Triton cases in Triton's interpreter, the float64 accuracy checks, the summary). The JSON has the
documented schema, every case carries impl and status, FLOPs executed are counted, errors against
float64 are small, and the headline ratios are worked out correctly."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import run as bench_run
from benchmarks._impls import IGNORE_INDEX, float64_loss_and_grads, make_inputs, naive_concept_loss
from benchmarks._measure import _is_oom, summarize_times
from benchmarks._plans import dry_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = dict(os.environ, PYTHON=sys.executable, WHEELS=str(tmp_path_factory.mktemp("no_wheels")),
               BENCH_BUDGET_S="3000", TEST_BUDGET_S="600")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        report = json.load(f)
    return report, out, proc.stdout


def test_dry_run_files_and_summary(dry_run):
    report, out, stdout = dry_run
    for name in ("results.json", "results.md", "suite.log", "tests.log", "bench.log", "time_memory_vs_N.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(os.listdir(out)) <= 8  # what the device tool brings back
    assert "GPU suite summary (DRY RUN" in stdout and "tests: passed" in stdout
    assert "1 passed" in (out / "tests.log").read_text()
    assert report["partial"] is False and report["settings"]["plan"] == "dry"


def test_json_schema(dry_run):
    report, out, _ = dry_run
    assert report["schema"] == "fused-concept-bench/1"
    for key in ("date", "command", "machine", "versions", "settings", "implementations", "matmul_peak",
                "cases", "accuracy", "headline_summary", "headline_ratios", "wall_time_s"):
        assert key in report, key
    assert report["command"].startswith("python -m benchmarks.run --device cpu --plan dry")
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["cpu_model"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["matmul_peak"]["tflops"] > 0 and len(report["matmul_peak"]["times_s"]) == 3
    # every planned case is recorded with impl and status; CUDA-only peers are skipped with a note
    assert [(c["impl"], c["n"], c["k"], c["head"]) for c in report["cases"]] == [
        (c["impl"], c["n"], c["k"], c["head"]) for c in dry_plan("cpu")]
    for peer in ("liger", "cce"):
        got = [c for c in report["cases"] if c["impl"] == peer]
        assert got and all(c["status"] == "skipped" and c["note"] for c in got)
        assert report["implementations"][peer]["available"] is False
    headline = [c for c in report["cases"] if c["group"] == "headline"]
    assert (out / "results.md").read_text().count("| headline |") == len(headline) == 23
    assert {c["inputs"] for c in headline} == {"gaussian", "peaked"}


def test_cases_timed_and_measured(dry_run):
    report, _, _ = dry_run
    ok = [c for c in report["cases"] if c["status"] == "ok"]
    assert {c["impl"] for c in ok} == {"naive", "torch", "triton", "triton_rows", "auto", "triton_filter_off",
                                       "torch_lce_chunked"}
    for impl in ("triton", "triton_rows"):
        assert {c["head"] for c in ok if c["impl"] == impl} == {"trainable", "frozen"}
        assert any(c["softcap"] == 30.0 for c in ok if c["impl"] == impl)
    assert any(c["inputs"] == "peaked" for c in ok if c["impl"] == "triton_rows")
    for c in ok:
        assert len(c["fwd_bwd"]["times_s"]) == c["repeats"]
        assert len(c["fwd"]["times_s"]) == c["fwd_repeats"]
        med = c["fwd_bwd"]["median_s"]
        assert c["fwd_bwd"]["min_s"] <= med <= c["fwd_bwd"]["max_s"] and med > 0
        useful = (4 if c["head"] == "frozen" else 6) * c["n"] * c["d"] * c["v"]
        assert c["flops_fwd_bwd_useful"] == useful
        assert math.isclose(c["tflops_fwd_bwd"], useful / med / 1e12, rel_tol=1e-9)
        assert c["mem_fwd_bwd_transient_mib"] is not None and c["mem_fwd_bwd_transient_mib"] >= 0
    for c in report["cases"]:
        assert c["status"] in ("ok", "skipped", "OOM", "error", "timeout")
        if c["impl"] in ("naive", "torch", "triton", "triton_rows", "auto", "torch_lce_chunked"):
            assert c["status"] == "ok", c


def test_flops_executed_from_tile_counts(dry_run):
    """Triton's recompute strategies: forward 2 + recompute 2 + (4, or 2 for a frozen head) x (kept / total)
    tiles, N D V units; without its filter every tile is kept: 8 (6) N D V. The torch path, impl="auto" (the
    torch path) and Triton's strategy "rows": 6 (4)."""
    report, _, _ = dry_run
    for c in report["cases"]:
        if c["status"] != "ok":
            continue
        ndv = c["n"] * c["d"] * c["v"]
        if c["impl"] in ("triton_rows", "auto"):
            assert c["tiles"] is None
            assert c["flops_fwd_bwd_executed"] == (4 if c["head"] == "frozen" else 6) * ndv
        elif c["impl"].startswith("triton"):
            t = c["tiles"]
            products = 2 if c["head"] == "frozen" else 4
            assert 0 < t["kept"] <= t["total"]
            assert math.isclose(c["flops_fwd_bwd_executed"], ndv * (4 + products * t["kept"] / t["total"]))
            if c["impl"] == "triton_filter_off":
                assert t["kept"] == t["total"]
        elif c["impl"] == "torch":
            assert c["flops_fwd_bwd_executed"] == (4 if c["head"] == "frozen" else 6) * ndv
        if c["flops_fwd_bwd_executed"] is not None:
            assert math.isclose(c["tflops_fwd_bwd_executed"],
                                c["flops_fwd_bwd_executed"] / c["fwd_bwd"]["median_s"] / 1e12)


def test_errors_against_float64_small(dry_run):
    report, _, _ = dry_run
    checked = [a for a in report["accuracy"] if a["status"] == "ok"]
    assert {(a["impl"], a["k"], a["softcap"]) for a in checked} >= {
        (impl, k, cap) for impl in ("naive", "torch", "triton", "triton_rows")
        for k, cap in ((0, None), (11, None), (0, 30.0))}
    assert {a["impl"] for a in checked if a["inputs"] == "peaked"} >= {"naive", "torch", "triton", "triton_rows"}
    for a in checked:
        loss_tol, grad_tol = (1e-5, 1e-4) if a["dtype"] == "float32" else (1e-2, 2e-2)
        assert a["loss_rel_err"] < loss_tol, a
        assert a["d_hidden_err"] < grad_tol and a["d_weight_err"] < grad_tol, a
        assert a["loss_float64"] > 0


def test_chunk_micro_benchmark_ran(dry_run):
    """The per-chunk pieces of strategy "rows": the three products (the float32 d_weight where the device
    has out_dtype products), the row kernel in both launch modes and the copy, at each chunk size."""
    report, _, stdout = dry_run
    micro = report["chunk_micro"]
    assert micro["status"] == "ok" and [r["chunk_rows"] for r in micro["rows"]] == [16, 32]
    for row in micro["rows"]:
        got = {p["piece"]: p for p in row["pieces"]}
        assert set(got) == {"logits", "d_hidden", "d_weight bf16 beta=1", "d_weight fp32 beta=1", "kernel FUSED",
                            "kernel GIVEN", "copy"}
        for name in ("kernel FUSED", "kernel GIVEN", "copy"):
            assert got[name]["median_s"] > 0 and got[name]["gb_s"] > 0
        assert got["logits"]["tflops"] > 0
    assert "strategy rows, per chunk" in stdout


def test_peaked_inputs_are_peaked():
    """inputs="peaked": the target's logit stands out (a high max probability, mostly at the target), unlike
    the Gaussian inputs' near-uniform softmax; the weight and the targets are the same."""
    g_h, g_w, g_y, _ = make_inputs(256, 64, 2048, 0, seed=4)
    p_h, p_w, p_y, _ = make_inputs(256, 64, 2048, 0, seed=4, inputs="peaked")
    assert torch.equal(g_w, p_w) and torch.equal(g_y, p_y)
    for h, low, high in ((g_h, 0.0, 0.2), (p_h, 0.4, 0.9)):
        p = torch.softmax(h @ g_w.T, 1)
        assert low <= float(p.max(1).values.mean()) <= high
    valid = p_y >= 0
    assert float((torch.softmax(p_h @ p_w.T, 1).argmax(1) == p_y)[valid].float().mean()) > 0.3


def test_oracle_matches_contract_by_hand():
    """The float64 oracle against a per-row loop over the contract's formulas."""
    h, w, y, c = make_inputs(12, 8, 40, 3, seed=5)
    loss, dh, dw = float64_loss_and_grads(h, w, y, c)
    z = h.double() @ w.double().T
    total, valid = 0.0, 0
    for i in range(12):
        if y[i] == IGNORE_INDEX:
            continue
        valid += 1
        lse = torch.logsumexp(z[i], 0)
        total += (lse - z[i, y[i]]).item()
        ids = {int(t) for t in c[i] if t >= 0}
        if ids:
            ids.add(int(y[i]))
            total += (lse - torch.logsumexp(z[i, sorted(ids)], 0)).item()
    assert valid > 0 and (c >= 0).any()
    assert math.isclose(loss.item(), total / valid, rel_tol=1e-12)
    assert dh.shape == h.shape and dw.shape == w.shape and dw.abs().max() > 0


def test_inputs_concepts_are_distinct_and_in_range():
    h, w, y, c = make_inputs(300, 4, 50, 11, seed=2)
    assert h.abs().min() > 0 or h.std() > 0.5
    for i in range(300):
        ids = [int(t) for t in c[i] if t >= 0]
        assert len(set(ids)) == len(ids) and all(0 <= t < 50 for t in ids)
        if y[i] != IGNORE_INDEX:
            assert int(y[i]) not in ids
        else:
            assert not ids
    assert (c >= 0).any(1).float().mean() > 0.2 and (y == IGNORE_INDEX).any()


def test_naive_gradient_matches_float64():
    h, w, y, c = make_inputs(64, 16, 300, 11, seed=4)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = naive_concept_loss(h, w, y, c)
    loss.backward()
    loss64, dh64, dw64 = float64_loss_and_grads(h, w, y, c)
    assert math.isclose(loss.item(), loss64.item(), rel_tol=1e-5)
    torch.testing.assert_close(h.grad.double(), dh64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), dw64, rtol=1e-4, atol=1e-6)


def _fake(impl, k, t, mem):
    return {"group": "headline", "label": "x", "impl": impl, "k": k, "n": 8, "d": 4, "v": 16,
            "dtype": "float32", "device": "cpu", "repeats": 3, "status": "ok",
            "fwd_bwd": summarize_times([t, t, t]), "mem_fwd_bwd_transient_mib": mem,
            "tflops_fwd_bwd": 1.0}


def test_headline_ratios_and_verdicts():
    cases = [_fake("torch", 11, 1.0, 10.0), _fake("reference", 11, 1.0, 100.0),
             _fake("naive", 11, 0.5, 100.0), _fake("torch", 0, 2.0, 1.0),
             _fake("torch_lce_chunked", 0, 1.0, 1.0)]
    lines, ratios = bench_run.headline_summary(cases)
    text = "\n".join(lines)
    assert ratios["x: K=11: torch / reference time"] == pytest.approx(1.0)
    assert ratios["x: K=11: torch / reference transient memory"] == pytest.approx(0.1)
    assert ratios["x: K=0: torch / torch_lce_chunked time"] == pytest.approx(2.0)
    assert "torch / reference time: 1.000x (target <= 1.1x)  PASS" in text
    assert "torch / torch_lce_chunked time: 2.000x (target <= 1x)  FAIL" in text
    assert ratios["x: K=0: torch / naive time"] is None  # naive K=0 missing: n/a, not invented


def test_oom_is_recognised():
    assert _is_oom(RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB"))
    assert _is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                "can't allocate memory: you tried to allocate 1234 bytes."))
    assert not _is_oom(ValueError("targets: id 99999 outside [0, 1024)"))


def test_child_past_its_timeout_is_recorded_not_dropped():
    from benchmarks._measure import run_case_in_child

    case = {"group": "headline", "label": "t", "impl": "naive", "n": 4096, "d": 576,
            "v": 49152, "k": 0, "dtype": "float32", "device": "cpu", "warmup": 0,
            "repeats": 3, "fwd_repeats": 3, "seed": 0}
    result = run_case_in_child(case, timeout_s=0.05)
    assert result["status"] == "timeout" and "0 s" in result["note"]
    assert result["impl"] == "naive" and result["n"] == 4096
