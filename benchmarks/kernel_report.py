"""Compile every kernel in every configuration the dispatcher can choose, for a GPU architecture,
without a GPU, and print one JSON object per compiled kernel:

    python -m benchmarks.kernel_report --arch 80 --arch 90 [--jobs 2]

Runs with whichever Triton is importable; to check another version without touching the environment,
put it first on the path: `pip install --no-deps --target DIR triton==3.6.0` then
`PYTHONPATH=DIR python -m benchmarks.kernel_report ...` (what `make test` and tests/backends/test_triton_compile.py do).

keys: kernel (the @triton.jit function's name), config (dtype and features), launch_config (the
dispatcher's name for it), arch, triton (version), registers, spill_bytes (ptxas spill stores + loads),
stack_bytes, shared_bytes (Triton's shared memory for the launch), shared_limit (the architecture's
per-block opt-in maximum), has_hgmma (warpgroup MMA in the SASS; checked for the sm_90 matrix kernels on
16-bit operands, null elsewhere), wgmma_in_ptx, cp_async_in_ptx (asynchronous copies: the software
pipeline), ptxas_warnings (e.g. serialised wgmma), matmul (kernel built on tl.dot tiles), num_warps,
num_stages, blocks. Exit status 1 unless every row is clean (`clean`).

Compiled from scratch with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, with the
specialisations Triton gives at run time (pointers 16-byte aligned, unit strides along D, pointers the
launcher passes as None as constexpr None); ptxas's -v log gives the resources, Triton's bundled
cuobjdump the SASS. Must run with TRITON_INTERPRET unset (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_PTR = {"16bit-bf16": "*bf16", "16bit-fp16": "*fp16", "fp32": "*fp32"}
# Pointers the launcher (fused_concept/_triton_path.py) passes as None in each owner mode of
# _dense_grad_kernel: Triton then compiles them as constexpr None, and so does this report.
_UNUSED = {"OWNER_ATOMIC": ("scratch_ptr", "keep_ptr", "loc_ptr", "sp_ptr"),
           "OWNER_ROWS": ("dw_ptr", "db_ptr", "keep_ptr", "loc_ptr", "sp_ptr"),
           "OWNER_COLUMNS": ("dh_ptr", "keep_ptr", "loc_ptr", "sp_ptr"),
           "OWNER_CHUNK": ("dh_ptr", "dw_ptr", "db_ptr")}
_FULL = dict(HAS_BIAS=True, HAS_SOFTCAP=True)


def _owner(name: str, **features) -> dict:
    from fused_concept.kernels import dense_grad

    unused = {p: None for p in _UNUSED[name] if not (p == "keep_ptr" and features.get("FILTER"))}
    return dict(OWNER=getattr(dense_grad, name).value, **features, **unused)


def _plan():
    """[(launch config name, dtype class, dtype, feature dict)]: every configuration the dispatcher can
    choose, each with its features all on (bias, softcap, and the filter or label smoothing, which exclude
    each other: the most registers), for bf16, fp16 and fp32 matrix kernels (bf16 and fp32 for the gather
    kernels, whose code does not depend on the 16-bit format; strategy "rows"' chunk_rows in its FUSED and
    GIVEN launch modes), plus the variants the defaults run: chunk_matmul without skip lists (filter off:
    float32's default) and the kernels without bias / softcap."""
    from fused_concept.kernels import configs

    plan = []
    for dt in ("16bit-bf16", "16bit-fp16", "fp32"):
        cls = dt.split("-")[0]
        plan.append(("dense_stats", cls, dt, dict(_FULL, SUM_LOGITS=False, zsum_ptr=None)))
        plan.append(("dense_stats_smoothing", cls, dt, dict(_FULL, SUM_LOGITS=True)))
        # the filter and label smoothing exclude each other (the launcher refuses both): two variants
        smoothing = (False, True) if dt != "16bit-fp16" else (False,)
        for uniform in smoothing:
            flags = dict(FILTER=not uniform, HAS_UNIFORM=uniform, **_FULL, **({} if uniform else {"uni_ptr": None}))
            plan.append(("dense_grad_h", cls, dt, _owner("OWNER_ROWS", DO_DH=True, DO_DW=False, DO_DB=False,
                                                         HAS_SPARSE=False, **flags)))
            plan.append(("dense_grad_w", cls, dt, _owner("OWNER_COLUMNS", DO_DH=False, DO_DW=True, DO_DB=True,
                                                         HAS_SPARSE=False, **flags)))
            plan.append(("dense_grad_atomic", cls, dt, _owner("OWNER_ATOMIC", DO_DH=True, DO_DW=True, DO_DB=True,
                                                              HAS_SPARSE=False, **flags)))
            plan.append(("dense_grad_chunk", cls, dt, _owner("OWNER_CHUNK", DO_DH=False, DO_DW=False, DO_DB=False,
                                                             HAS_SPARSE=True, **flags)))
        # dH += dR_c @ W_c (A row-major, float32 C) and dW_c = dR_c^T @ H (A a transposed view)
        skips = (True, False) if dt != "16bit-fp16" else (True,)
        for skip in skips:
            plan.append(("chunk_matmul", cls, dt, dict(ACCUMULATE=True, A_TRANSPOSED=False, SKIP=skip)))
            plan.append(("chunk_matmul", cls, dt, dict(ACCUMULATE=False, A_TRANSPOSED=True, SKIP=skip)))
        plan += _chunk_rows_plan(cls, dt)
        if dt == "16bit-fp16":
            continue
        plan.append(("sparse_logits", cls, dt, dict(_FULL, HAS_SOFT=True, REDUCE=True, STORE_Z=False)))
        plan.append(("sparse_logits", cls, dt, dict(_FULL, HAS_SOFT=False, REDUCE=False, STORE_Z=True)))
        plan.append(("sparse_grad_hidden", cls, dt, {}))
        plan.append(("sparse_grad_weight", cls, dt, dict(DO_DW=True, DO_DB=True)))
        plan.append(("tile_lists", cls, dt, dict(MAX=256)))
    # bf16 without bias and softcap (what most LM heads run): the forward, and the default backwards
    plain = dict(HAS_BIAS=False, HAS_SOFTCAP=False, b_ptr=None)
    no_uniform = dict(HAS_UNIFORM=False, uni_ptr=None)
    plan.append(("dense_stats", "16bit", "16bit-bf16", dict(plain, SUM_LOGITS=False, zsum_ptr=None)))
    plan.append(("dense_grad_h", "16bit", "16bit-bf16", _owner("OWNER_ROWS", DO_DH=True, DO_DW=False, DO_DB=False,
                                                               FILTER=True, HAS_SPARSE=False, **plain, **no_uniform)))
    plan.append(("dense_grad_chunk", "16bit", "16bit-bf16", _owner("OWNER_CHUNK", DO_DH=False, DO_DW=False,
                                                                   DO_DB=False, FILTER=True, HAS_SPARSE=True,
                                                                   **plain, **no_uniform)))
    plan.append(("chunk_rows", "16bit", "16bit-bf16", dict(_ROWS_FUSED, HAS_BIAS=False, HAS_SOFTCAP=False,
                                                           HAS_SOFT=False, HAS_MARGIN=False, HAS_ZLOSS=False,
                                                           HAS_UNIFORM=False, SUM_LOGITS=False, BLOCK_J=16,
                                                           b_ptr=None, soft_w_ptr=None, zsum_ptr=None)))
    assert {(k, c) for k, c, _, _ in plan} == set(configs.all_configs(90))
    return plan


# strategy "rows" (kernels/chunk_rows.py): the forward's FUSED launch and the backward's GIVEN launch, each with
# every feature it can take; BLOCK_J (ids per row, per call) 32: a soft set of K = 15 with its target
_ROWS_FUSED = dict(FUSED=True, coef_dense_ptr=None, coef_target_ptr=None, coef_set_ptr=None, uni_ptr=None)
_ROWS_GIVEN = dict(FUSED=False, HAS_MARGIN=False, HAS_ZLOSS=False, SUM_LOGITS=False, g_ptr=None, alpha_ptr=None,
                   beta_ptr=None, max_ptr=None, arg_ptr=None, target_ptr=None, soft_dot_ptr=None, zsum_ptr=None)


def _chunk_rows_plan(cls: str, dt: str):
    full = dict(_FULL, HAS_SOFT=True, HAS_UNIFORM=True, BLOCK_J=32)
    plan = [("chunk_rows", cls, dt, dict(full, **_ROWS_FUSED, HAS_MARGIN=True, HAS_ZLOSS=True, SUM_LOGITS=True))]
    if dt != "16bit-fp16":
        plan.append(("chunk_rows", cls, dt, dict(full, **_ROWS_GIVEN)))
    return plan


def _signature(kernel: str, fp: str, features: dict):
    """(jit function, {arg: type}, extra constexprs) of one launch config's kernel."""
    import triton

    from fused_concept.kernels import (chunk_matmul, dense_grad, dense_stats, sparse_grad_hidden,
                                       sparse_grad_weight, sparse_logits, tile_lists)

    if kernel.startswith("dense_stats"):
        fn = dense_stats._dense_stats_kernel
        sig = dict(h_ptr=fp, w_ptr=fp, b_ptr=fp, max_ptr="*fp32", sumexp_ptr="*fp32", arg_ptr="*i64", zsum_ptr="*fp32",
                   N="i32", V="i32", D="i32", chunk="i32", vocab_start="i32", softcap="fp32",
                   stride_hn="i32", stride_hd="i32", stride_wv="i32", stride_wd="i32", stride_b="i32")
        extra = dict(UPCAST=False, DOT_PRECISION="ieee")
    elif kernel.startswith("dense_grad"):
        fn = dense_grad._dense_grad_kernel
        # chunk pass: the chunk buffer dR_c is in the input dtype; sweeps: the scratch slabs too
        sig = dict(h_ptr=fp, w_ptr=fp, b_ptr=fp, lse_ptr="*fp32", coef_ptr="*fp32", uni_ptr="*fp32", dh_ptr="*fp32",
                   dw_ptr="*fp32", db_ptr="*fp32", scratch_ptr=fp, keep_ptr="*i8", loc_ptr="*i32",
                   sp_ptr="*fp32", J="i32", id_base="i32", N="i32", V="i32", D="i32", chunk="i32",
                   softcap="fp32", filter_eps="fp32",
                   stride_hn="i32", stride_hd="i32", stride_wv="i32", stride_wd="i32", stride_b="i32")
        extra = dict(UPCAST=False, DOT_PRECISION="ieee")
    elif kernel == "chunk_matmul":
        fn = chunk_matmul._chunk_matmul_kernel
        # dH accumulates in float32 (ACCUMULATE); dW_c is stored in the input dtype
        sig = dict(a_ptr=fp, b_ptr=fp, c_ptr="*fp32" if features["ACCUMULATE"] else fp, list_ptr="*i32",
                   count_ptr="*i32", M="i32", N="i32", K="i32", list_stride="i32", stride_am="i32",
                   stride_ak="i32", stride_bk="i32", stride_bn="i32", stride_cm="i32", stride_cn="i32")
        transposed = features["A_TRANSPOSED"]
        extra = dict(UPCAST=False, DOT_PRECISION="ieee", stride_bn=1, stride_cn=1,
                     **({"stride_am": 1} if transposed else {"stride_ak": 1}))
        if not features["SKIP"]:
            extra.update(list_ptr=None, count_ptr=None, LIST_ROWS=1, LIST_K=1)
    elif kernel == "chunk_rows":
        from fused_concept.kernels import chunk_rows

        fn = chunk_rows._chunk_rows_kernel
        f32 = "*fp32"
        sig = dict(z_ptr=fp, b_ptr=fp, ids_ptr="*i64", soft_w_ptr=f32, g_ptr=f32, alpha_ptr=f32, beta_ptr=f32,
                   coef_dense_ptr=f32, coef_target_ptr=f32, coef_set_ptr=f32, uni_ptr=f32, max_ptr=f32,
                   arg_ptr="*i64", lse_ptr=f32, target_ptr=f32, set_lse_ptr=f32, soft_dot_ptr=f32, zsum_ptr=f32,
                   C="i32", V="i32", J="i32", S="i32", vocab_start="i32", softcap="fp32", margin="fp32",
                   z_loss="fp32", target_scale="fp32", uni_scale="fp32", stride_z="i32", stride_b="i32")
        extra = dict(EMULATE_RNE=False)
    elif kernel == "sparse_logits":
        fn = sparse_logits._sparse_logits_kernel
        sig = dict(h_ptr=fp, w_ptr=fp, b_ptr=fp, ids_ptr="*i64", soft_w_ptr="*fp32", z_ptr="*fp32",
                   target_ptr="*fp32", set_lse_ptr="*fp32", soft_dot_ptr="*fp32", N="i32", V="i32", D="i32",
                   J="i32", S="i32", vocab_start="i32", softcap="fp32",
                   stride_hn="i32", stride_hd="i32", stride_wv="i32", stride_wd="i32", stride_b="i32")
        extra = {}
    elif kernel == "sparse_grad_hidden":
        fn = sparse_grad_hidden._sparse_grad_hidden_kernel
        sig = dict(w_ptr=fp, ids_ptr="*i64", s_ptr="*fp32", dh_ptr="*fp32", N="i32", V="i32", D="i32", J="i32",
                   vocab_start="i32", stride_wv="i32", stride_wd="i32")
        extra = {}
    elif kernel == "sparse_grad_weight":
        fn = sparse_grad_weight._sparse_grad_weight_kernel
        sig = dict(h_ptr=fp, seg_start_ptr="*i64", seg_id_ptr="*i64", pair_row_ptr="*i64", pair_s_ptr="*fp32",
                   dw_ptr="*fp32", db_ptr="*fp32", U="i32", D="i32", stride_hn="i32", stride_hd="i32")
        extra = {}
    elif kernel == "tile_lists":
        fn = tile_lists._tile_lists_kernel
        sig = dict(keep_ptr="*i8", by_row_ptr="*i32", count_row_ptr="*i32", by_col_ptr="*i32",
                   count_col_ptr="*i32", R="i32", C="i32")
        extra = {}
    else:
        raise KeyError(kernel)
    return (fn.fn if isinstance(fn, triton.runtime.Heuristics) else fn), sig, extra


def _source(kernel: str, dt: str, features: dict, blocks: dict):
    """ASTSource with the specialisations Triton gives contiguous tensors, D and row strides % 16 == 0."""
    from triton.compiler import ASTSource

    jit_fn, sig, extra = _signature(kernel, _PTR[dt], features)
    features = {k: v for k, v in features.items() if k != "A_TRANSPOSED"}
    # unit strides along D (and of the bias) are specialised to the constant 1, as at run time
    unit = {k: 1 for k in ("stride_hd", "stride_wd", "stride_b") if k in sig}
    constexprs = dict(blocks, **features, **extra, **unit)
    for k in constexprs:
        sig[k] = "constexpr"
    for k in jit_fn.arg_names:
        sig.setdefault(k, "constexpr")
    sig = {k: sig[k] for k in jit_fn.arg_names}
    # row strides and D (multiples of 16 for the usual model shapes); chunk is a multiple of BLOCK_N
    multiples = {"D", "stride_hn", "stride_wv", "chunk", "stride_z"}  # stride_z: V of the usual heads
    if kernel == "chunk_matmul":  # M, K: rows and chunk width of dR_c; N: D
        multiples |= {"N", "stride_am", "stride_ak", "stride_bk", "stride_cm"}
    aligned = [i for i, k in enumerate(jit_fn.arg_names)
               if (sig[k].startswith("*") or k in multiples) and sig[k] != "constexpr"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return ASTSource(fn=jit_fn, signature=sig, constexprs=constexprs, attrs=attrs)


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _skip_tiles(kernel: str, cls: str, features: dict, arch: int) -> dict:
    """LIST_ROWS / LIST_K of a skipping chunk_matmul: the chunk pass's tile (rows x vocabulary ids), seen
    from A = dR_c (dH product) or A = dR_c^T (dW product), as the launcher passes them."""
    from fused_concept.kernels import configs

    if kernel != "chunk_matmul" or not features["SKIP"]:
        return {}
    tile = configs.all_configs(arch)[("dense_grad_chunk", cls)].blocks
    rows, cols = tile["BLOCK_M"], tile["BLOCK_N"]
    return dict(LIST_ROWS=cols, LIST_K=rows) if features["A_TRANSPOSED"] else dict(LIST_ROWS=rows, LIST_K=cols)


def _sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_nvidia_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def compile_one(item):
    kernel, cls, dt, features, arch = item
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from fused_concept.kernels import configs

    cfg = configs.all_configs(arch)[(kernel, cls)]
    src = _source(kernel, dt, dict(features, **_skip_tiles(kernel, cls, features, arch)), cfg.blocks)
    # compile afresh (no cache hit) and keep ptxas's -v log: registers, spill stores / loads, stack
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    log = out.getvalue()
    if "registers" not in log:
        raise RuntimeError(f"no ptxas resource line for {kernel} ({dt}, sm_{arch}):\n{log}")

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    matmul = kernel.startswith("dense_") or kernel == "chunk_matmul"
    # SASS (cuobjdump, ~1 s each) where HGMMA is expected: the sm_90 matrix kernels on 16-bit operands
    sass = _sass(compiled.asm["cubin"]) if arch >= 90 and matmul and cls == "16bit" else None
    ptx = compiled.asm["ptx"]
    feature_txt = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in features.items()
                           if not k.endswith("_ptr"))
    return dict(
        kernel=src.name, config=f"{dt}:{feature_txt}" if feature_txt else dt, arch=arch,
        triton=triton.__version__, registers=grab(r"Used (\d+) registers"),
        spill_bytes=grab(r"(\d+) bytes spill stores") + grab(r"(\d+) bytes spill loads"),
        stack_bytes=grab(r"(\d+) bytes stack frame"),
        shared_bytes=int(compiled.metadata.shared), shared_limit=SHARED_LIMIT.get(arch, 48 * 1024),
        has_hgmma=None if sass is None else "HGMMA" in sass, wgmma_in_ptx=ptx.count("wgmma.mma_async"),
        cp_async_in_ptx=ptx.count("cp.async"), ptxas_warnings=[ln.strip() for ln in log.splitlines()
                                                              if "warning" in ln.lower()],
        matmul=matmul, launch_config=kernel, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        blocks=dict(cfg.blocks), function=compiled.metadata.name,
    )


def clean(row) -> bool:
    """No spills, no stack, shared memory within the limit, no ptxas warning (e.g. serialised wgmma),
    and HGMMA in every sm_90 16-bit matrix kernel."""
    return (row["spill_bytes"] == 0 and row["stack_bytes"] == 0 and row["shared_bytes"] <= row["shared_limit"]
            and not row["ptxas_warnings"] and row["has_hgmma"] is not False)


def report(archs, jobs: int = 1):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile kernels for a GPU")
    items = [(k, c, dt, f, arch) for arch in archs for (k, c, dt, f) in _plan()]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            return list(pool.map(compile_one, items))
    return [compile_one(i) for i in items]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 or 90")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    rows = report(args.arch or [90], jobs=args.jobs)
    json.dump(rows, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if all(clean(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
