"""Compile every kernel in every configuration the dispatcher can choose, for a GPU architecture,
without a GPU, and print one JSON object per compiled kernel:

    python -m benchmarks.kernel_report --arch 90            (or --arch 80; repeatable)

keys: kernel (the @triton.jit function's name), config, launch_config (the dispatcher's name for it), arch, registers, spill_bytes (ptxas spill
stores + loads), stack_bytes, shared_bytes (Triton's shared memory for the launch), shared_limit (the
architecture's per-block opt-in maximum), has_hgmma (sm_90 warpgroup MMA instructions in the SASS),
matmul (kernel built on tl.dot tiles), num_warps, num_stages.

Compiled from scratch with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`; the
cubin is read back with Triton's bundled ptxas (for the -v resource line) and cuobjdump (for SASS).
Must run with TRITON_INTERPRET unset (the interpreter replaces the kernels by Python functions).
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


def _plan():
    """[(kernel name, config label, dtype class, feature dict)] for every dispatcher configuration."""
    from fused_concept.kernels import configs

    plan = []
    for dt in ("16bit-bf16", "16bit-fp16", "fp32"):
        cls = dt.split("-")[0]
        plan.append(("dense_stats", cls, dt, dict(HAS_BIAS=True, HAS_SOFTCAP=True)))
        for cfg_name, owner, flags in (("dense_grad_h", 1, dict(DO_DH=True, DO_DW=False, DO_DB=False)),
                                       ("dense_grad_w", 2, dict(DO_DH=False, DO_DW=True, DO_DB=True)),
                                       ("dense_grad_atomic", 0, dict(DO_DH=True, DO_DW=True, DO_DB=True))):
            plan.append((cfg_name, cls, dt, dict(OWNER=owner, HAS_BIAS=True, HAS_SOFTCAP=True, FILTER=True,
                                                 **flags)))
        plan.append(("dense_grad_chunk", cls, dt, dict(OWNER=3, DO_DH=False, DO_DW=False, DO_DB=False,
                                                       HAS_BIAS=True, HAS_SOFTCAP=True, FILTER=True,
                                                       HAS_SPARSE=True)))
        # dH += dR_c @ W_c (A row-major) and dW_c = dR_c^T @ H (A a transposed view)
        plan.append(("chunk_matmul", cls, dt, dict(ACCUMULATE=True, A_TRANSPOSED=False)))
        plan.append(("chunk_matmul", cls, dt, dict(ACCUMULATE=False, A_TRANSPOSED=True)))
        plan.append(("sparse_logits", cls, dt, dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SOFT=True, REDUCE=True,
                                                    STORE_Z=False)))
        plan.append(("sparse_logits", cls, dt, dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SOFT=False,
                                                    REDUCE=False, STORE_Z=True)))
        plan.append(("sparse_grad_hidden", cls, dt, {}))
        plan.append(("sparse_grad_weight", cls, dt, dict(DO_DW=True, DO_DB=True)))
    # the plain variants (no bias, softcap or filter) of the matrix kernels, compiled once per arch
    plain = dict(HAS_BIAS=False, HAS_SOFTCAP=False)
    plan.append(("dense_stats", "16bit", "16bit-bf16", plain))
    plan.append(("dense_grad_h", "16bit", "16bit-bf16", dict(OWNER=1, DO_DH=True, DO_DW=False, DO_DB=False,
                                                             FILTER=False, **plain)))
    plan.append(("dense_grad_w", "16bit", "16bit-bf16", dict(OWNER=2, DO_DH=False, DO_DW=True, DO_DB=False,
                                                             FILTER=False, **plain)))
    assert {(k, c) for k, c, _, _ in plan} == set(configs.all_configs(90))
    return plan


def _source(kernel: str, dt: str, features: dict, blocks: dict):
    """ASTSource with the specialisations Triton gives contiguous tensors, D and row strides % 16 == 0."""
    import triton
    from triton.compiler import ASTSource

    from fused_concept.kernels import (chunk_matmul, dense_grad, dense_stats, sparse_grad_hidden,
                                       sparse_grad_weight, sparse_logits)

    fp = _PTR[dt]
    if kernel == "dense_stats":
        fn = dense_stats._dense_stats_kernel
        sig = dict(h_ptr=fp, w_ptr=fp, b_ptr=fp, max_ptr="*fp32", sumexp_ptr="*fp32", arg_ptr="*i64",
                   N="i32", V="i32", D="i32", chunk="i32", vocab_start="i32", softcap="fp32",
                   stride_hn="i32", stride_hd="i32", stride_wv="i32", stride_wd="i32", stride_b="i32")
        extra = dict(UPCAST=False, DOT_PRECISION="ieee")
    elif kernel.startswith("dense_grad"):
        fn = dense_grad._dense_grad_kernel
        sig = dict(h_ptr=fp, w_ptr=fp, b_ptr=fp, lse_ptr="*fp32", coef_ptr="*fp32", dh_ptr="*fp32",
                   dw_ptr="*fp32", db_ptr="*fp32", scratch_ptr=fp, N="i32", V="i32", D="i32", chunk="i32", softcap="fp32",
                   filter_eps="fp32", loc_ptr="*i32", sp_ptr="*fp32", J="i32", id_base="i32",
                   stride_hn="i32", stride_hd="i32", stride_wv="i32", stride_wd="i32", stride_b="i32")
        extra = dict(UPCAST=False, DOT_PRECISION="ieee")
        if "HAS_SPARSE" not in features:  # the sparse terms are fused into OWNER 3 only (J = 0 otherwise)
            extra["HAS_SPARSE"] = False
    elif kernel == "chunk_matmul":
        fn = chunk_matmul._chunk_matmul_kernel
        # dH accumulates in float32 (ACCUMULATE); dW_c is stored in the input dtype
        sig = dict(a_ptr=fp, b_ptr=fp, c_ptr="*fp32" if features["ACCUMULATE"] else fp,
                   M="i32", N="i32", K="i32", stride_am="i32",
                   stride_ak="i32", stride_bk="i32", stride_bn="i32", stride_cm="i32", stride_cn="i32")
        features = dict(features)
        transposed = features.pop("A_TRANSPOSED")
        extra = dict(UPCAST=False, DOT_PRECISION="ieee", stride_bn=1, stride_cn=1,
                     **({"stride_am": 1} if transposed else {"stride_ak": 1}))
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
    else:
        raise KeyError(kernel)
    jit_fn = fn.fn if isinstance(fn, triton.runtime.Heuristics) else fn
    # unit strides along D (and of the bias) are specialised to the constant 1, as at run time
    unit = {k: 1 for k in ("stride_hd", "stride_wd", "stride_b") if k in sig}
    constexprs = dict(blocks, **features, **extra, **unit)
    for k in constexprs:
        sig[k] = "constexpr"
    for k in jit_fn.arg_names:
        sig.setdefault(k, "constexpr")
    sig = {k: sig[k] for k in jit_fn.arg_names}
    # row strides and D (multiples of 16 for the usual model shapes); chunk is a multiple of BLOCK_N
    multiples = {"D", "stride_hn", "stride_wv", "chunk"}
    if kernel == "chunk_matmul":  # M, K: rows and chunk width of dR_c; N: D
        multiples |= {"N", "stride_am", "stride_ak", "stride_bk", "stride_cm"}
    aligned = [i for i, k in enumerate(jit_fn.arg_names) if sig[k].startswith("*") or k in multiples]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return ASTSource(fn=jit_fn, signature=sig, constexprs=constexprs, attrs=attrs)


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(item):
    kernel, cls, dt, features, arch = item
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from fused_concept.kernels import configs

    cfg = configs.all_configs(arch)[(kernel, cls)]
    src = _source(kernel, dt, features, cfg.blocks)
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
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True,
                              check=True).stdout

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    name = compiled.metadata.name
    feature_txt = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in features.items())
    return dict(
        kernel=src.name, config=f"{dt}:{feature_txt}" if feature_txt else dt, arch=arch,
        registers=grab(r"Used (\d+) registers"),
        spill_bytes=grab(r"(\d+) bytes spill stores") + grab(r"(\d+) bytes spill loads"),
        stack_bytes=grab(r"(\d+) bytes stack frame"),
        shared_bytes=int(compiled.metadata.shared), shared_limit=SHARED_LIMIT.get(arch, 48 * 1024),
        has_hgmma="HGMMA" in sass, matmul=kernel.startswith("dense_") or kernel == "chunk_matmul",
        launch_config=kernel,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, blocks=dict(cfg.blocks), function=name,
    )


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
    bad = [r for r in rows if r["spill_bytes"] or r["shared_bytes"] > r["shared_limit"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
