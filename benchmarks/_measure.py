"""Measuring one benchmark case: time, memory and accuracy.

A case is a plain dict (JSON-able), e.g.::

    {"impl": "torch", "n": 2048, "d": 576, "v": 49152, "k": 11, "dtype": "float32",
     "device": "cpu", "warmup": 0, "repeats": 3, "fwd_repeats": 1, "seed": 0}

``repeats`` counts the timed forward+backward calls, ``fwd_repeats`` (default: ``repeats``)
the timed forward-only calls, each after ``warmup`` untimed calls.

``measure_case(case)`` runs it in the current process and returns a result dict. On the CPU
the runner calls it in a fresh child process per case (``run_case_in_child``) so that the
process's peak resident set size belongs to that case alone. See docs/benchmarks.md for the
memory method.
"""
from __future__ import annotations

import functools
import gc
import os
import statistics
import time
import traceback

import torch

from benchmarks._impls import IMPLEMENTATIONS, float64_loss_and_grads, make_inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2.0 ** 20


# --------------------------------------------------------------------------------------------
# CPU resident memory of this process (Linux /proc)
# --------------------------------------------------------------------------------------------
def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    """The kernel's high-water mark of this process's resident set (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs).
    Returns False where the kernel refuses; then only the first measured run is exact."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap():
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim(0)``), so that a
    baseline RSS read right after counts live memory only, not memory freed by an earlier
    phase that a later one could reuse without the RSS growing. No-op without glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _is_oom(exc):
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text
        or "cannot allocate memory" in text or isinstance(exc, MemoryError))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def summarize_times(times):
    """median and spread (min, max, and the relative half-range) of repeat times in seconds."""
    if not times:
        return None
    med = statistics.median(times)
    return {"times_s": times, "median_s": med, "min_s": min(times), "max_s": max(times),
            "spread_rel": (max(times) - min(times)) / (2 * med) if med > 0 else 0.0}


def flops_fwd(n, d, v):
    return 2.0 * n * d * v


def flops_fwd_bwd(n, d, v, frozen=False):
    """The useful work of forward+backward: 6*N*D*V (the logits, dH and dW products; 4*N*D*V for a
    frozen head, which has no dW). Recomputation is not counted: TFLOP/s compares implementations."""
    return (4.0 if frozen else 6.0) * n * d * v


# fwd+bwd FLOPs each implementation executes, in units of N*D*V: (trainable head, frozen head, how)
_EXECUTED = {
    "naive": (6, 4, "logits, dH, dW products once each"),
    "reference": (6, 4, "logits, dH, dW products once each"),
    "torch": (6, 4, "logit gradient formed during the forward sweep (no recompute), dH, dW"),
    "gemm_floor": (6, 6, "the three products"),
    "liger": (6, 4, "logit gradient formed in the forward (chunked, no recompute), dH, dW"),
    "triton_rows": (6, 4, "strategy rows: logits, dH, dW once each on cuBLAS (gradient formed in the forward)"),
    "auto": (6, 4, "impl='auto' is the torch path: logit gradient formed during the forward sweep, dH, dW"),
}


def flops_executed(case, tiles=None):
    """(FLOPs of one forward+backward as executed, or None when not known; how they were counted).
    Triton, chunked strategy: forward 2 NDV + recompute 2 NDV + the products of the tiles it multiplied
    out (dH and dW: 4 NDV, frozen head dH only: 2 NDV; x kept / total, from `tiles`, a TileCount of one
    forward+backward)."""
    n, d, v = case["n"], case["d"], case["v"]
    frozen = case.get("head") == "frozen"
    ndv = float(n) * d * v
    if case["impl"] in _EXECUTED:
        trainable, fixed, how = _EXECUTED[case["impl"]]
        return (fixed if frozen else trainable) * ndv, how
    if case["impl"].startswith("triton"):
        products = 2.0 if frozen else 4.0
        if tiles is not None and tiles.kept is not None and tiles.total:
            return ndv * (4.0 + products * tiles.kept / tiles.total), (
                f"forward 2 + recompute 2 + products of {tiles.kept} of {tiles.total} tiles x {products:g} (NDV)")
        return None, "tile counts not available"
    if case["impl"] == "cce":
        return None, "forward 2 + recompute 2 + products of the tiles above its own filter (<= 8 NDV)"
    return None, "not known"


def matmul_peak(device, dtype, size, repeats=10):
    """The device's matrix-product rate: median TFLOP/s of torch.mm on random [size, size] operands
    (3 warm-ups, `repeats` timed products)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=device).to(dtype)
    b = torch.randn(size, size, generator=g, device=device).to(dtype)
    times = []
    for r in range(3 + repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if r >= 3:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "device": device, "median_s": med,
            "tflops": 2.0 * size ** 3 / med / 1e12, "times_s": times}


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
def _phase(fn, hidden, weight, targets, concepts, *, backward, device, warmup, repeats,
           mem_base):
    """Run ``warmup + repeats`` calls; return (times of the repeats, peak memory above
    ``mem_base`` over the repeats in bytes, or None when it cannot be measured)."""
    times, peaks, all_reset = [], [], True
    for r in range(warmup + repeats):
        hidden.grad = None
        weight.grad = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            exact = True
        else:
            reset = reset_peak_rss()
            all_reset = all_reset and reset
            exact = reset or r == 0
        _sync(device)
        t0 = time.perf_counter()
        if backward:
            loss = fn(hidden, weight, targets, concepts)
            loss.backward()
        else:
            with torch.no_grad():
                loss = fn(hidden, weight, targets, concepts)
        _sync(device)
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        del loss
        if r >= warmup:
            times.append(elapsed)
            if exact:
                peaks.append(peak - mem_base)
    hidden.grad = None
    weight.grad = None
    return times, (max(peaks) if peaks else None), all_reset


def _count_tiles(fn, hidden, weight, targets, concepts):
    """TileCount of one forward+backward of a Triton implementation (None for the others)."""
    from fused_concept.backends.triton_path import count_tiles

    with count_tiles() as counted:
        fn(hidden, weight, targets, concepts).backward()
    hidden.grad = None
    weight.grad = None
    return counted


def _ok_fields(case, fwd_times, bwd_times, tiles, fwd_peak, bwd_peak, base_inputs, base_grads, fwd_reset,
               bwd_reset):
    """The measured fields of a case that ran: times, FLOP rates, memory and how it was measured."""
    n, d, v = case["n"], case["d"], case["v"]
    frozen = case.get("head") == "frozen"
    device = case["device"]
    fwd, bwd = summarize_times(fwd_times), summarize_times(bwd_times)
    useful = flops_fwd_bwd(n, d, v, frozen)
    executed, how = flops_executed(case, tiles)
    return dict(
        status="ok",
        fwd=fwd,
        fwd_bwd=bwd,
        tflops_fwd=flops_fwd(n, d, v) / fwd["median_s"] / 1e12,
        flops_fwd_bwd_useful=useful,
        tflops_fwd_bwd=useful / bwd["median_s"] / 1e12,
        flops_fwd_bwd_executed=executed,
        tflops_fwd_bwd_executed=None if executed is None else executed / bwd["median_s"] / 1e12,
        flops_executed_how=how,
        tiles=None if tiles is None else {"total": tiles.total, "kept": tiles.kept},
        mem_fwd_peak_above_inputs_mib=None if fwd_peak is None else max(fwd_peak, 0) / MIB,
        mem_fwd_bwd_transient_mib=None if bwd_peak is None else max(bwd_peak, 0) / MIB,
        mem_fwd_bwd_peak_above_inputs_mib=(None if bwd_peak is None else
                                           max(bwd_peak + base_grads - base_inputs, 0) / MIB),
        mem_fwd_bwd_peak_mib=(None if bwd_peak is None or device != "cuda" else
                              (bwd_peak + base_grads) / MIB),
        mem_method=("cuda allocator peak (max_memory_allocated), reset per repeat"
                    if device == "cuda" else
                    "VmHWM of a fresh child process, " + (
                        "reset per repeat" if fwd_reset and bwd_reset else
                        "NOT resettable here: peak of the first timed repeat of each phase "
                        "only, and the forward+backward figure may include the forward's")),
    )


def measure_case(case):
    """Time and memory of one (implementation, shape, dtype, head, softcap) case, in this process."""
    result = dict(case)
    impl = IMPLEMENTATIONS[case["impl"]]
    device, dtype = case["device"], DTYPES[case["dtype"]]
    n, d, v, k = case["n"], case["d"], case["v"], case["k"]
    frozen = case.get("head") == "frozen"
    fn = functools.partial(impl.loss_fn, softcap=case.get("softcap"))
    reason = impl.unavailable_reason(device, case.get("softcap"))
    if reason is not None:
        result.update(status="skipped", note=reason)
        return result
    try:
        if case.get("prewarm", True):
            # warm-up at a tiny shape: library initialisation, thread pools, code paths
            small = make_inputs(64, min(d, 64), min(v, 512), k, dtype, device, seed=1)
            hs, ws = small[0].requires_grad_(True), small[1].requires_grad_(not frozen)
            fn(hs, ws, small[2], small[3]).backward()
            with torch.no_grad():
                fn(hs, ws, small[2], small[3])
            del small, hs, ws
            gc.collect()
            _sync(device)

        hidden, weight, targets, concepts = make_inputs(n, d, v, k, dtype, device, seed=case.get("seed", 0),
                                                        inputs=case.get("inputs", "gaussian"))
        hidden.requires_grad_(True)
        weight.requires_grad_(not frozen)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            base_inputs = torch.cuda.memory_allocated()
        else:
            release_free_heap()
            base_inputs = current_rss_bytes()
        fwd_times, fwd_peak, fwd_reset = _phase(fn, hidden, weight, targets, concepts,
                                                backward=False, device=device, warmup=case["warmup"],
                                                repeats=case.get("fwd_repeats", case["repeats"]),
                                                mem_base=base_inputs)
        # the gradients' own memory is not transient: count it in the baseline by holding
        # zero-filled tensors of their size while the baseline is read, then freeing them
        gc.collect()
        grad_of = (hidden,) if frozen else (hidden, weight)
        if device == "cuda":
            base_grads = torch.cuda.memory_allocated() + sum(t.numel() * t.element_size() for t in grad_of)
        else:
            release_free_heap()
            dummies = [torch.zeros_like(t) for t in grad_of]
            base_grads = current_rss_bytes()
            del dummies
        bwd_times, bwd_peak, bwd_reset = _phase(fn, hidden, weight, targets, concepts,
                                                backward=True, device=device, warmup=case["warmup"],
                                                repeats=case["repeats"], mem_base=base_grads)
        counted = case["impl"].startswith("triton") and case["impl"] not in _EXECUTED  # the recompute strategies
        tiles = _count_tiles(fn, hidden, weight, targets, concepts) if counted else None
    except Exception as exc:  # recorded, never dropped
        if _is_oom(exc):
            result.update(status="OOM", note=f"{type(exc).__name__}: {str(exc)[:200]}")
        else:
            result.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:300]}",
                          traceback=traceback.format_exc()[-2000:])
        return result
    result.update(_ok_fields(case, fwd_times, bwd_times, tiles, fwd_peak, bwd_peak, base_inputs, base_grads,
                             fwd_reset, bwd_reset))
    return result


# --------------------------------------------------------------------------------------------
# accuracy against float64
# --------------------------------------------------------------------------------------------
def _max_rel(a, ref):
    a = a.detach().to("cpu", torch.float64)
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def accuracy_case(case):
    """Loss and gradient error of one implementation against the float64 oracle.

    loss error: |loss - loss64| / |loss64|; gradient errors: max|g - g64| / max|g64| for
    d_hidden and d_weight (a normalised max-norm error)."""
    result = dict(case)
    impl = IMPLEMENTATIONS[case["impl"]]
    device, dtype = case["device"], DTYPES[case["dtype"]]
    softcap = case.get("softcap")
    reason = impl.unavailable_reason(device, softcap)
    if reason is not None:
        result.update(status="skipped", note=reason)
        return result
    hidden, weight, targets, concepts = make_inputs(case["n"], case["d"], case["v"], case["k"],
                                                    dtype, device, seed=case.get("seed", 0),
                                                    inputs=case.get("inputs", "gaussian"))
    loss64, dh64, dw64 = float64_loss_and_grads(hidden, weight, targets, concepts, softcap)
    try:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        loss = impl.loss_fn(hidden, weight, targets, concepts, softcap=softcap)
        loss.backward()
    except Exception as exc:
        result.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:300]}")
        return result
    result.update(
        status="ok",
        loss=loss.item(),
        loss_float64=loss64.item(),
        loss_rel_err=abs(loss.item() - loss64.item()) / abs(loss64.item()),
        d_hidden_err=_max_rel(hidden.grad, dh64),
        d_weight_err=_max_rel(weight.grad, dw64),
    )
    return result


# --------------------------------------------------------------------------------------------
# fresh child process per case (CPU memory)
# --------------------------------------------------------------------------------------------
def _child_entry(case, conn):
    try:
        conn.send(measure_case(case))
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent
        conn.send(dict(case, status="error", note=f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


_CONTEXT = None


def _context():
    """A forkserver context whose server has imported torch once, so each case's child
    starts from a fresh process (fresh heap) without paying the torch import again."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        # torch._dynamo: the first call of any torch custom op (fused_concept's, torch's chunked
        # linear_cross_entropy) imports it, ~2.5 s that would otherwise land in every case's first timing
        preload = ["torch", "torch._dynamo", "benchmarks._impls", "benchmarks._measure"]
        try:
            import fused_concept  # noqa: F401

            preload.append("fused_concept")
        except Exception:
            pass
        ctx.set_forkserver_preload(preload)
        _CONTEXT = ctx
    return _CONTEXT


def run_case_in_child(case, timeout_s):
    """``measure_case(case)`` in a fresh child process. A child killed by a signal (the
    kernel's OOM killer sends SIGKILL) is recorded as OOM; one past ``timeout_s`` as timeout."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_entry, args=(case, send), daemon=True)
    proc.start()
    send.close()
    result = None
    if recv.poll(timeout_s):
        try:
            result = recv.recv()
        except EOFError:
            result = None
    proc.join(timeout=5 if result is not None else 0.1)
    if proc.is_alive():
        proc.kill()
        proc.join()
        if result is None:
            return dict(case, status="timeout", note=f"no result within {timeout_s:.0f} s")
    if result is None:
        code = proc.exitcode
        if code is not None and code < 0 and -code == 9:
            return dict(case, status="OOM",
                        note="child killed by SIGKILL (the kernel's OOM killer)")
        return dict(case, status="error", note=f"child exited with code {code} and no result")
    return result
