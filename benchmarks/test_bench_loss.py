"""pytest-benchmark: forward and forward+backward of every implementation, at a small shape
and at the headline shape of the device (CPU: SmolLM2-135M; CUDA: Llama-3-8B).

    pytest benchmarks --benchmark-only                       # run, print the table
    pytest benchmarks --benchmark-only --benchmark-autosave  # keep a baseline
    pytest benchmarks --benchmark-only --benchmark-compare   # compare with the last baseline
    pytest benchmarks --benchmark-only -k small              # seconds instead of minutes

Concept implementations run at K=11 and K=0; the plain cross-entropy peers at K=0 only.
Unavailable implementations (Triton without CUDA, Liger / cut-cross-entropy not installed)
are skipped with the reason."""
import pytest
import torch

from benchmarks._impls import IMPLEMENTATIONS, make_inputs
from benchmarks._measure import flops_fwd, flops_fwd_bwd
from benchmarks._plans import CPU_HEADLINE, GPU_HEADLINES, HEADLINE_K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
HEADLINE = GPU_HEADLINES[0] if DEVICE == "cuda" else CPU_HEADLINE
SHAPES = {
    "small": {"n": 512, "d": 256, "v": 8192, "rounds": 10, "warmup": 1},
    "headline": {"n": HEADLINE["n"], "d": HEADLINE["d"], "v": HEADLINE["v"],
                 "rounds": 3 if DEVICE == "cpu" else 10, "warmup": 0 if DEVICE == "cpu" else 2},
}
CASES = [(impl, HEADLINE_K) for impl in ("naive", "reference", "torch", "triton")] + [
    (impl, 0) for impl in ("naive", "reference", "torch", "triton", "torch_lce_chunked",
                           "liger", "cce")]

_inputs_cache = {}


def _inputs(shape_name, k):
    key = (shape_name, k)
    if key not in _inputs_cache:
        _inputs_cache.clear()  # one shape alive at a time
        s = SHAPES[shape_name]
        h, w, y, c = make_inputs(s["n"], s["d"], s["v"], k, DTYPE, DEVICE, seed=0)
        _inputs_cache[key] = (h.requires_grad_(True), w.requires_grad_(True), y, c)
    return _inputs_cache[key]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("passes", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl,k", CASES, ids=[f"{i}-K{k}" for i, k in CASES])
def test_loss(benchmark, impl, k, passes, shape_name):
    reason = IMPLEMENTATIONS[impl].unavailable_reason(DEVICE)
    if reason is not None:
        pytest.skip(f"{impl}: {reason}")
    s = SHAPES[shape_name]
    hidden, weight, targets, concepts = _inputs(shape_name, k)
    loss_fn = IMPLEMENTATIONS[impl].loss_fn
    benchmark.group = f"{shape_name} N={s['n']} D={s['d']} V={s['v']} K={k} {passes}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), n=s["n"], d=s["d"], v=s["v"],
                                k=k, flops=flops_fwd_bwd(s["n"], s["d"], s["v"])
                                if passes == "fwd_bwd" else flops_fwd(s["n"], s["d"], s["v"]))

    def clear_grads():
        hidden.grad = None
        weight.grad = None

    def forward():
        with torch.no_grad():
            loss = loss_fn(hidden, weight, targets, concepts)
        _sync()
        return loss

    def forward_backward():
        loss = loss_fn(hidden, weight, targets, concepts)
        loss.backward()
        _sync()
        return loss

    target = forward if passes == "fwd" else forward_backward
    loss = benchmark.pedantic(target, setup=clear_grads, rounds=s["rounds"],
                              warmup_rounds=s["warmup"], iterations=1)
    assert torch.isfinite(loss).item()
    if passes == "fwd_bwd":
        assert weight.grad is not None and torch.isfinite(weight.grad).all()
    clear_grads()
