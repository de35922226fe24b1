"""Every kernel, in every configuration the dispatcher can choose, compiles for sm_80 and sm_90 without a
GPU, with each tested Triton version: the environment's own (3.8.0, pinned) and 3.6.0 (the GPU image's),
which `make setup` installs apart, in the venv's `triton-3.6.0` folder, and which goes first on
PYTHONPATH here. Zero spilled bytes, no stack frame, shared memory within the architecture's limit, no
ptxas warning, and the sm_90 matrix kernels on 16-bit operands on warpgroup MMA (HGMMA in the SASS).
Runs `python -m benchmarks.kernel_report` (the user-facing check) in subprocesses, because this test
process runs the kernels in Triton's interpreter; the two versions compile side by side."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Triton versions compiled against, besides the environment's own: folder inside the venv -> version
EXTRA_TRITONS = {"triton-3.6.0": "3.6.0"}


def _extra_paths():
    found = {}
    for folder, version in EXTRA_TRITONS.items():
        path = os.path.join(sys.prefix, folder)
        if os.path.isdir(os.path.join(path, "triton")):
            found[version] = path
    return found


def _report(python_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join([python_path, ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.Popen([sys.executable, "-m", "benchmarks.kernel_report", "--arch", "80", "--arch", "90"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def rows():
    """{triton version: report rows}, the versions compiled at the same time (one process each)."""
    import triton

    runs = {triton.__version__: _report(None)}
    runs.update({version: _report(path) for version, path in _extra_paths().items()})
    out = {}
    for version, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode in (0, 1), stderr[-4000:]
        out[version] = json.loads(stdout)
        assert {r["triton"] for r in out[version]} == {version}
    return out


def test_both_tested_triton_versions_are_compiled(rows):
    import triton

    if not _extra_paths():
        pytest.skip(f"{list(EXTRA_TRITONS)} not in {sys.prefix}: `make setup` installs it")
    assert set(rows) == {triton.__version__, *EXTRA_TRITONS.values()}


def test_every_dispatcher_config_is_compiled_for_both_archs(rows):
    from benchmarks import kernel_report as report
    from fused_concept.kernels import configs

    plan = report._plan()
    for version, got in rows.items():
        assert len(got) == 2 * len(plan), version
        for arch in configs.ARCHS:
            mine = [r for r in got if r["arch"] == arch]
            assert {(r["kernel"], r["config"]) for r in mine} == {(r["kernel"], r["config"]) for r in got
                                                                 if r["arch"] == 90}
            for (kernel, cls), cfg in configs.all_configs(arch).items():
                hits = [r for r in mine if r["launch_config"] == kernel and r["config"].startswith(cls)]
                assert hits, f"{kernel}/{cls} not compiled for sm_{arch} with Triton {version}"
                assert all(r["blocks"] == cfg.blocks and r["num_warps"] == cfg.num_warps for r in hits)


def test_no_spills_and_shared_memory_within_limits(rows):
    for version, got in rows.items():
        for r in got:
            where = f"{r['kernel']} [{r['config']}] sm_{r['arch']}, Triton {version}"
            assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, f"{where}: {r['spill_bytes']} spilled bytes"
            assert 0 < r["registers"] <= 255, where
            assert r["shared_bytes"] <= {80: 163 * 1024, 90: 227 * 1024}[r["arch"]], where
            assert not r["ptxas_warnings"], f"{where}: {r['ptxas_warnings']}"


def test_sm90_matrix_loops_use_hgmma(rows):
    for version, got in rows.items():
        matmul16 = [r for r in got if r["arch"] == 90 and r["matmul"] and r["config"].startswith("16bit")]
        # (dense_stats with and without the logit sum, 4 dense_grad owner modes with the filter, 2
        # chunk_matmul layouts with skip lists) x (bf16, fp16) + 4 bf16 owner modes with label smoothing
        # + 2 bf16 chunk_matmul layouts without skip lists + 3 bf16 kernels without bias / softcap
        assert len(matmul16) == 25, version
        for r in matmul16:
            assert r["has_hgmma"], f"{r['kernel']} [{r['config']}] has no HGMMA on sm_90 (Triton {version})"
            assert r["wgmma_in_ptx"] > 0
        assert not any(r["wgmma_in_ptx"] for r in got if r["arch"] == 80)


def test_chunk_rows_kernel_is_compiled_in_both_launch_modes(rows):
    """Strategy "rows": the forward's FUSED launch (bf16, fp16, fp32, all features; bf16 without any) and the
    backward's GIVEN launch (bf16, fp32), per architecture: 6 of them, none a matrix kernel."""
    for version, got in rows.items():
        for arch in (80, 90):
            mine = [r for r in got if r["launch_config"] == "chunk_rows" and r["arch"] == arch]
            assert len(mine) == 6, (version, arch)
            assert sum("FUSED=1" in r["config"] for r in mine) == 4 and not any(r["matmul"] for r in mine)


def test_matrix_loops_are_software_pipelined(rows):
    """Asynchronous copies (cp.async) in every 16-bit matrix kernel: the K loops are pipelined, also the
    chunk products that walk the skip lists (the tile index is loaded inside the loop)."""
    for version, got in rows.items():
        for r in got:
            if r["matmul"] and r["config"].startswith("16bit") and r["num_stages"] > 1:
                assert r["cp_async_in_ptx"] > 0, f"{r['kernel']} [{r['config']}] sm_{r['arch']} ({version})"
