"""Every kernel, in every configuration the dispatcher can choose, compiles for sm_80 and sm_90 without a
GPU: zero spilled bytes, shared memory within the architecture's limit, and the sm_90 matrix loops on
warpgroup MMA (HGMMA). Runs `python -m benchmarks.kernel_report` (the user-facing check) in a
subprocess, because this test process runs the kernels in Triton's interpreter."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--arch", "80", "--arch", "90",
                          "--jobs", str(min(4, os.cpu_count() or 1))],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode in (0, 1), out.stderr[-4000:]
    return json.loads(out.stdout)


def test_every_dispatcher_config_is_compiled_for_both_archs(rows):
    from fused_concept.kernels import configs
    from benchmarks import kernel_report as report

    plan = report._plan()
    assert len(rows) == 2 * len(plan)
    for arch in configs.ARCHS:
        mine = [r for r in rows if r["arch"] == arch]
        assert {(r["kernel"], r["config"]) for r in mine} == {(r["kernel"], r["config"]) for r in rows
                                                             if r["arch"] == 90}
        for (kernel, cls), cfg in configs.all_configs(arch).items():
            got = [r for r in mine if r["launch_config"] == kernel and r["config"].startswith(cls)]
            assert got, f"{kernel}/{cls} not compiled for sm_{arch}"
            assert all(r["blocks"] == cfg.blocks and r["num_warps"] == cfg.num_warps for r in got)
    keys = {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "has_hgmma"}
    assert all(keys <= set(r) for r in rows)


def test_no_spills_and_shared_memory_within_limits(rows):
    for r in rows:
        where = f"{r['kernel']} [{r['config']}] sm_{r['arch']}"
        assert r["spill_bytes"] == 0, f"{where}: {r['spill_bytes']} spilled bytes"
        assert 0 < r["registers"] <= 255, where
        assert r["shared_bytes"] <= {80: 163 * 1024, 90: 227 * 1024}[r["arch"]], where


def test_sm90_matrix_loops_use_hgmma(rows):
    matmul16 = [r for r in rows if r["arch"] == 90 and r["matmul"] and r["config"].startswith("16bit")]
    # (dense_stats, 4 dense_grad owner modes, 2 chunk_matmul layouts) x (bf16, fp16) + 3 plain bf16
    assert len(matmul16) == 17
    for r in matmul16:
        assert r["has_hgmma"], f"{r['kernel']} [{r['config']}] has no HGMMA on sm_90"
    assert not any(r["has_hgmma"] for r in rows if r["arch"] == 80)
