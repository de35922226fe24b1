"""Sanity of the benchmark runner (benchmarks/run.py) at tiny shapes: the JSON it writes has
the documented schema, errors against float64 are computed and small, and the headline
ratios are worked out correctly. Budget: ~20 s on 2 cores (the run itself is a few seconds)."""
import json
import math

import pytest
import torch

from benchmarks import run as bench_run
from benchmarks._impls import IGNORE_INDEX, float64_loss_and_grads, make_inputs, naive_concept_loss
from benchmarks._measure import _is_oom, summarize_times


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench_run.main(["--device", "cpu", "--plan", "smoke", "--out", str(out)])
    with open(out / "results.json") as f:
        report = json.load(f)
    return report, out


def test_json_schema(smoke_report):
    report, out = smoke_report
    assert report["schema"] == "fused-concept-bench/1"
    for key in ("date", "command", "machine", "versions", "settings", "implementations",
                "cases", "accuracy", "headline_summary", "headline_ratios", "wall_time_s"):
        assert key in report, key
    assert report["command"].startswith("python -m benchmarks.run --device cpu")
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["cpu_model"]
    assert report["versions"]["torch"] == torch.__version__
    # optional peers are recorded, never dropped: on the CPU Liger is skipped with a note
    liger = [c for c in report["cases"] if c["impl"] == "liger"]
    assert liger and liger[0]["status"] == "skipped" and liger[0]["note"]
    assert report["implementations"]["cce"]["available"] is False
    assert (out / "results.md").read_text().count("| headline |") == 5
    assert (out / "time_memory_vs_N.png").stat().st_size > 1000


def test_cases_timed_and_measured(smoke_report):
    report, _ = smoke_report
    ok = [c for c in report["cases"] if c["status"] == "ok"]
    assert {c["impl"] for c in ok} >= {"naive", "torch_lce_chunked"}
    for c in ok:
        assert len(c["fwd_bwd"]["times_s"]) == c["repeats"]
        assert len(c["fwd"]["times_s"]) == c["fwd_repeats"]
        med = c["fwd_bwd"]["median_s"]
        assert c["fwd_bwd"]["min_s"] <= med <= c["fwd_bwd"]["max_s"] and med > 0
        expected = 6 * c["n"] * c["d"] * c["v"] / med / 1e12
        assert math.isclose(c["tflops_fwd_bwd"], expected, rel_tol=1e-9)
        assert c["mem_fwd_bwd_transient_mib"] is not None and c["mem_fwd_bwd_transient_mib"] >= 0
    for c in report["cases"]:
        assert c["status"] in ("ok", "skipped", "OOM", "error", "timeout")
        if c["impl"] in ("naive", "torch_lce_chunked"):
            assert c["status"] == "ok", c


def test_errors_against_float64_small(smoke_report):
    report, _ = smoke_report
    checked = [a for a in report["accuracy"] if a["status"] == "ok"]
    assert {(a["impl"], a["k"]) for a in checked} >= {("naive", 0), ("naive", 11)}
    for a in checked:
        assert a["dtype"] == "float32"
        assert a["loss_rel_err"] < 1e-5, a
        assert a["d_hidden_err"] < 1e-4 and a["d_weight_err"] < 1e-4, a
        assert a["loss_float64"] > 0


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
