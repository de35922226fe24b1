"""Which cases a run measures. Shapes are (N tokens, D hidden, V vocabulary).

Headline shapes (from the issue): CPU SmolLM2-135M (2048, 576, 49152); GPU Llama-3-8B
(16384, 4096, 128256) and Gemma-2-2B (8192, 2304, 256000), the cut-cross-entropy paper's.
"""
from __future__ import annotations

CPU_HEADLINE = {"name": "SmolLM2-135M", "n": 2048, "d": 576, "v": 49152}
GPU_HEADLINES = [
    {"name": "Llama-3-8B", "n": 16384, "d": 4096, "v": 128256},
    {"name": "Gemma-2-2B", "n": 8192, "d": 2304, "v": 256000},
]
CONCEPT_SIZES = (0, 1, 11, 32)
HEADLINE_K = 11

CONCEPT_IMPLS = ("naive", "reference", "torch", "triton")
PLAIN_CE_PEERS = ("torch_lce_chunked", "liger", "cce")


def _case(group, impl, n, d, v, k, dtype, device, warmup, repeats, label=None,
          fwd_repeats=None):
    return {"group": group, "label": label, "impl": impl, "n": n, "d": d, "v": v, "k": k,
            "dtype": dtype, "device": device, "warmup": warmup, "repeats": repeats,
            "fwd_repeats": repeats if fwd_repeats is None else fwd_repeats, "seed": 0}


def _headline_cases(shape, dtype, device, impls_k, impls_ce, warmup, repeats,
                    fwd_repeats=None):
    cases = []
    for impl in impls_k:
        cases.append(_case("headline", impl, shape["n"], shape["d"], shape["v"], HEADLINE_K,
                           dtype, device, warmup, repeats, shape["name"], fwd_repeats))
    for impl in impls_ce:
        cases.append(_case("headline", impl, shape["n"], shape["d"], shape["v"], 0,
                           dtype, device, warmup, repeats, shape["name"], fwd_repeats))
    return cases


def cpu_plan(quick):
    """CPU cases. Quick: the headline comparisons (forward+backward median of 3, forward
    timed once) plus small sweeps (3 and 2), sized for about 5 minutes on 2 idle cores.
    Full: more points, all implementations, one full-size warm-up, 5 repeats of each."""
    dev = "cpu"
    h = CPU_HEADLINE
    if quick:
        w, r = 0, 3   # warm-up: one tiny-shape call per phase in the child (see _measure)
        cases = _headline_cases(h, "float32", dev, ("naive", "reference", "torch"),
                                ("naive", "torch", "torch_lce_chunked"), w, r, fwd_repeats=1)
        d = h["d"]
        for n in (256, 512):                         # N sweep at the headline V
            for impl in ("naive", "torch"):
                cases.append(_case("sweep_n", impl, n, d, h["v"], HEADLINE_K, "float32", dev, w, r,
                                   fwd_repeats=2))
        for v in (6144, 12288):                      # V sweep at the headline N
            for impl in ("naive", "torch"):
                cases.append(_case("sweep_v", impl, h["n"], d, v, HEADLINE_K, "float32", dev, w, r,
                                   fwd_repeats=2))
        for k in (0, 1, 32):                         # K sweep (11 is in the V sweep)
            cases.append(_case("sweep_k", "torch", h["n"], d, 6144, k, "float32", dev, w, r,
                               fwd_repeats=2))
        for impl in ("naive", "torch"):              # dtype
            cases.append(_case("sweep_dtype", impl, h["n"], d, 6144, HEADLINE_K, "bfloat16",
                               dev, w, r, fwd_repeats=2))
        return cases
    w, r = 1, 5
    cases = _headline_cases(h, "float32", dev, ("naive", "reference", "torch"),
                            ("naive", "reference", "torch", "torch_lce_chunked"), w, r)
    d = h["d"]
    for n in (256, 512, 1024, 4096):
        for impl in ("naive", "reference", "torch"):
            cases.append(_case("sweep_n", impl, n, d, h["v"], HEADLINE_K, "float32", dev, w, r))
        cases.append(_case("sweep_n", "torch_lce_chunked", n, d, h["v"], 0, "float32", dev, w, r))
    for v in (6144, 12288, 24576, 98304):
        for impl in ("naive", "reference", "torch"):
            cases.append(_case("sweep_v", impl, h["n"], d, v, HEADLINE_K, "float32", dev, w, r))
        cases.append(_case("sweep_v", "torch_lce_chunked", h["n"], d, v, 0, "float32", dev, w, r))
    for k in (0, 1, 32):
        for impl in ("naive", "torch"):
            cases.append(_case("sweep_k", impl, h["n"], d, h["v"], k, "float32", dev, w, r))
    for dtype in ("bfloat16",):
        for impl in ("naive", "torch"):
            for k in (0, HEADLINE_K):
                cases.append(_case("sweep_dtype", impl, h["n"], d, h["v"], k, dtype, dev, w, r))
    return cases


def cuda_plan(quick):
    """CUDA cases: both GPU headline shapes in bf16 for every implementation (concept
    implementations at K=11 and K=0, plain-CE peers at K=0), then sweeps."""
    dev = "cuda"
    w, r = (1, 5) if quick else (2, 10)
    cases = []
    for shape in GPU_HEADLINES:
        cases += _headline_cases(shape, "bfloat16", dev, CONCEPT_IMPLS,
                                 ("naive", "torch", "triton") + PLAIN_CE_PEERS, w, r)
    llama = GPU_HEADLINES[0]
    d = llama["d"]
    impls = ("naive", "triton", "torch_lce_chunked", "liger", "cce")
    for n in ((2048, 4096, 8192) if quick else (1024, 2048, 4096, 8192, 32768)):
        for impl in impls:
            k = HEADLINE_K if impl in CONCEPT_IMPLS else 0
            cases.append(_case("sweep_n", impl, n, d, llama["v"], k, "bfloat16", dev, w, r))
    for v in ((32000, 64000, 256000) if quick else (32000, 64000, 200064, 256000)):
        for impl in impls:
            k = HEADLINE_K if impl in CONCEPT_IMPLS else 0
            cases.append(_case("sweep_v", impl, 8192, d, v, k, "bfloat16", dev, w, r))
    for k in (1, 32):
        cases.append(_case("sweep_k", "triton", 8192, d, llama["v"], k, "bfloat16", dev, w, r))
    for impl in ("naive", "torch", "triton"):
        cases.append(_case("sweep_dtype", impl, 8192, d, llama["v"], HEADLINE_K, "float32",
                           dev, w, r))
    return cases


def smoke_plan(device):
    """Tiny cases for the runner's own test: every code path, seconds in all."""
    cases = []
    for impl, k in (("naive", 11), ("torch", 11), ("torch_lce_chunked", 0), ("torch", 0),
                    ("liger", 0)):
        cases.append(_case("headline", impl, 128, 32, 1024, k, "float32", device, 0, 2, "smoke"))
    cases.append(_case("sweep_n", "torch", 256, 32, 1024, 11, "float32", device, 0, 2))
    return cases


def accuracy_plan(device, smoke=False):
    """Small-shape error checks against float64: every implementation, K in {0, 11},
    float32 and bfloat16 (float32 only in the smoke plan)."""
    n, d, v = (64, 32, 512) if smoke else (256, 64, 4096)
    dtypes = ("float32",) if smoke else ("float32", "bfloat16")
    impls = ("naive", "torch") if smoke else CONCEPT_IMPLS + PLAIN_CE_PEERS
    cases = []
    for dtype in dtypes:
        for impl in impls:
            for k in (0, HEADLINE_K):
                if impl in PLAIN_CE_PEERS and k:
                    continue
                cases.append({"impl": impl, "n": n, "d": d, "v": v, "k": k, "dtype": dtype,
                              "device": device, "seed": 3})
    return cases
