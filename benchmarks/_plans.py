"""Which cases a run measures. Shapes are (N tokens, D hidden, V vocabulary).

Headline shapes (from the issue): CPU SmolLM2-135M (2048, 576, 49152); GPU Llama-3-8B
(16384, 4096, 128256) and Gemma-2-2B (8192, 2304, 256000, logits soft-capped at 30), the
cut-cross-entropy paper's. A case's `head` is "trainable" (gradients for hidden and weight) or
"frozen" (hidden only, as under LoRA); `softcap` is None or the cap.
"""
from __future__ import annotations

CPU_HEADLINE = {"name": "SmolLM2-135M", "n": 2048, "d": 576, "v": 49152}
GPU_HEADLINES = [
    {"name": "Llama-3-8B", "n": 16384, "d": 4096, "v": 128256},
    {"name": "Gemma-2-2B", "n": 8192, "d": 2304, "v": 256000, "softcap": 30.0},
]
# smaller heads, triton against torch with a trainable and a frozen head: what impl="auto" chooses by
SHAPE_CLASSES = [
    {"name": "SmolLM2-135M", "n": 4096, "d": 576, "v": 49152},
    {"name": "Llama-3.2-1B", "n": 8192, "d": 2048, "v": 128256},
]
DRY_SHAPE_CLASSES = [{"name": "SmolLM2-135M", "n": 32, "d": 16, "v": 256}]
# the same two cases at tiny shapes: `gpu_suite.sh --dry-run` (CPU, Triton's interpreter)
DRY_HEADLINES = [
    {"name": "Llama-3-8B", "n": 64, "d": 32, "v": 512},
    {"name": "Gemma-2-2B", "n": 64, "d": 32, "v": 768, "softcap": 30.0},
]
CONCEPT_SIZES = (0, 1, 11, 32)
HEADLINE_K = 11

CONCEPT_IMPLS = ("naive", "reference", "torch", "triton")
PLAIN_CE_PEERS = ("torch_lce_chunked", "liger", "cce")


def _case(group, impl, n, d, v, k, dtype, device, warmup, repeats, label=None,
          fwd_repeats=None, head="trainable", softcap=None, prewarm=True, inputs="gaussian"):
    return {"group": group, "label": label, "impl": impl, "n": n, "d": d, "v": v, "k": k,
            "dtype": dtype, "device": device, "warmup": warmup, "repeats": repeats,
            "fwd_repeats": repeats if fwd_repeats is None else fwd_repeats, "seed": 0,
            "head": head, "softcap": softcap, "prewarm": prewarm, "inputs": inputs}


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
                                ("naive", "torch", "torch_lce_chunked", "gemm_floor"), w, r, fwd_repeats=1)
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
                            ("naive", "reference", "torch", "torch_lce_chunked", "gemm_floor"), w, r)
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


def suite_cases(shapes, classes, dtype, device, warmup, repeats, fwd_repeats, prewarm=True):
    """The GPU suite's cases, most important first (a run cut short by its time budget keeps these):
    at the Llama-3-8B shape, Triton's strategy "rows" (triton_rows), the default Triton strategy and the
    torch path at K=11 and K=0 with a trainable and a frozen head, impl="auto", the plain-CE peers and the
    naive loss at K=0, Triton without its tile filter, the naive loss at K=11; then the Gemma-2-2B shape
    (softcap 30); then the Llama-3-8B shape on "peaked" inputs (benchmarks/_impls.py: a trained model's
    confidence, where tile filters can skip); then triton_rows, triton and torch with a trainable and a
    frozen head at each of `classes` (smaller heads)."""
    llama, gemma = shapes
    cases = []

    def add(shape, impl, k, head="trainable", inputs="gaussian"):
        label = shape["name"] + ("" if inputs == "gaussian" else f" ({inputs})")
        cases.append(_case("headline", impl, shape["n"], shape["d"], shape["v"], k, dtype, device, warmup,
                           repeats, label, fwd_repeats, head=head, softcap=shape.get("softcap"),
                           prewarm=prewarm, inputs=inputs))

    for head in ("trainable", "frozen"):
        for k in (HEADLINE_K, 0):
            for impl in ("triton_rows", "triton", "torch"):
                add(llama, impl, k, head)
    add(llama, "auto", HEADLINE_K)
    for impl in ("liger", "cce", "naive", "triton_filter_off", "torch_lce_chunked"):
        add(llama, impl, 0)
    add(llama, "naive", HEADLINE_K)
    for impl, k in (("triton_rows", HEADLINE_K), ("triton", HEADLINE_K), ("torch", HEADLINE_K), ("triton_rows", 0),
                    ("triton", 0), ("torch", 0), ("liger", 0), ("cce", 0), ("naive", 0)):
        add(gemma, impl, k)
    for impl, k in (("triton_rows", HEADLINE_K), ("torch", HEADLINE_K), ("triton_rows", 0), ("liger", 0), ("cce", 0),
                    ("triton", 0)):
        add(llama, impl, k, inputs="peaked")
    for shape in classes:
        for head in ("trainable", "frozen"):
            for impl in ("triton_rows", "triton", "torch"):
                add(shape, impl, HEADLINE_K, head)
    return cases


def cuda_plan(quick):
    """CUDA cases: the suite (`suite_cases`, bf16: what `benchmarks/gpu_suite.sh` runs, with --quick),
    then, without --quick, sweeps of N and V at the Llama-3-8B width."""
    dev = "cuda"
    w, r, fr = (1, 3, 2) if quick else (2, 10, 10)
    cases = suite_cases(GPU_HEADLINES, SHAPE_CLASSES, "bfloat16", dev, w, r, fr)
    if quick:
        return cases
    llama = GPU_HEADLINES[0]
    d = llama["d"]
    impls = ("naive", "triton", "torch_lce_chunked", "liger", "cce")
    for n in (1024, 2048, 4096, 8192, 32768):
        for impl in impls:
            k = HEADLINE_K if impl in CONCEPT_IMPLS else 0
            cases.append(_case("sweep_n", impl, n, d, llama["v"], k, "bfloat16", dev, w, r))
    for v in (32000, 64000, 200064, 256000):
        for impl in impls:
            k = HEADLINE_K if impl in CONCEPT_IMPLS else 0
            cases.append(_case("sweep_v", impl, 8192, d, v, k, "bfloat16", dev, w, r))
    for k in (1, 32):
        cases.append(_case("sweep_k", "triton", 8192, d, llama["v"], k, "bfloat16", dev, w, r))
    for impl in ("naive", "torch", "triton"):
        cases.append(_case("sweep_dtype", impl, 8192, d, llama["v"], HEADLINE_K, "float32", dev, w, r))
    return cases


def dry_plan(device):
    """The suite's cases at tiny shapes, one repeat each, no tiny-shape pre-warm-up (`gpu_suite.sh
    --dry-run`: the plumbing on the CPU, the Triton cases in Triton's interpreter, the CPU runner's
    child processes): the first case of each (implementation, head, softcap or not) in the suite's
    order, which covers every code path the suite takes in half its cases, and one sweep point (the plots)."""
    seen, cases = set(), []
    for case in suite_cases(DRY_HEADLINES, DRY_SHAPE_CLASSES, "bfloat16", device, 0, 1, 1, prewarm=False):
        kind = (case["impl"], case["head"], case["softcap"] is not None, case["inputs"])
        if kind not in seen:
            seen.add(kind)
            cases.append(case)
    return cases + [_case("sweep_n", "torch", 256, 64, 1024, HEADLINE_K, "bfloat16", device, 0, 1, prewarm=False)]


def accuracy_plan(device, dry=False):
    """Small-shape error checks against float64: every implementation, K in {0, 11}, float32 and
    bfloat16, with softcap 30 at K=0, and K=11 on peaked inputs (the dry run: fewer implementations,
    peaked in bfloat16 only)."""
    n, d, v = (64, 32, 512) if dry else (256, 64, 4096)
    impls = (("naive", "torch", "triton", "triton_rows") if dry
             else CONCEPT_IMPLS + ("triton_rows", "auto") + PLAIN_CE_PEERS)
    cases = []
    for dtype in ("float32", "bfloat16"):
        for impl in impls:
            for k, softcap, inputs in ((0, None, "gaussian"), (HEADLINE_K, None, "gaussian"), (0, 30.0, "gaussian"),
                                       (HEADLINE_K, None, "peaked")):
                if (impl in PLAIN_CE_PEERS and k) or (dry and inputs == "peaked" and dtype == "float32"):
                    continue
                cases.append({"impl": impl, "n": n, "d": d, "v": v, "k": k, "dtype": dtype,
                              "device": device, "seed": 3, "softcap": softcap, "inputs": inputs})
    return cases
