"""The implementations the benchmarks compare, the inputs they share, and the float64 oracle.

Every implementation is a function ``loss_fn(hidden, weight, targets, concepts, softcap=None) -> scalar
loss`` computing, with ``reduction="mean"``, ``ntp_weight = concept_weight = 1`` and no margin,

    loss = (1 / N_valid) * sum_{i valid} [ ce_i + cl_i * [row i lists a concept id] ]

where ``ce_i = lse_i - z_{i, y_i}`` and ``cl_i = lse_i - log sum_{t in S_i} exp z_it`` with
``S_i`` = the row's concept ids plus its gold id (contract, marginal mode), and logits
``z = softcap * tanh(h W^T / softcap)`` (``z = h W^T`` without softcap). With no concepts
(``concepts is None``) it is the plain mean cross-entropy, which is what the plain-CE peers
(PyTorch's chunked ``linear_cross_entropy``, Liger-Kernel, Apple's cut-cross-entropy) compute.
``gemm_floor`` is no loss: it runs the three matrix products of a forward+backward (logits, dH, dW)
in 512-row chunks, the floor the chunked torch path is measured against.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
# inputs="peaked": h_i = PEAKED_SIGNAL * W_y / |W_y|^2 + PEAKED_NOISE * N(0, I): the target's logit sits
# PEAKED_SIGNAL above a noise of standard deviation 2 * PEAKED_NOISE (W ~ N(0, 4/D): |W_v|^2 ~ 4), so the
# softmax is as peaked as a trained model's on real text. Calibrated by `python -m benchmarks.peaked` on
# SmolLM2-135M's final hidden states on English news text (benchmarks/results/2026-12-04-peaked): mean max
# probability 0.41 / entropy 3.31 nats / target probability 0.27 against the model's 0.37 / 3.25 / 0.22 (at
# V = 49152, D = 576); 128 x 128 logit tiles whose largest probability is < 2^-12: 0.0% against 0.8%.
PEAKED_SIGNAL = 16.0
PEAKED_NOISE = 2.0
INPUT_KINDS = ("gaussian", "peaked")


def make_inputs(n, d, v, k, dtype=torch.float32, device="cpu", seed=0, ignored_fraction=0.05,
                content_fraction=0.5, inputs="gaussian", signal=None, noise=None):
    """Random inputs of one benchmark case (fresh, never zeros).

    ``inputs="gaussian"``: ``hidden`` ~ N(0, 1) and ``weight`` ~ N(0, 4/D), so logits have a standard
    deviation of about 2 and a near-uniform softmax (every tile of it matters). ``inputs="peaked"``: the same
    weight, hidden states built from the target's head row plus noise (PEAKED_SIGNAL, PEAKED_NOISE, or
    ``signal`` / ``noise``), calibrated on a real model. About ``ignored_fraction`` of the rows carry
    ``ignore_index``. With ``k > 0`` about ``content_fraction`` of the valid rows list between
    1 and ``k`` concept ids (the rest are ``-1`` pads); the listed ids are distinct and differ
    from the gold id, so the naive transcription needs no de-duplication. ``k == 0`` gives
    ``concepts=None`` (plain cross-entropy).
    """
    # the float tensors are drawn on the device itself (drawing a 2 GB head on the host and
    # copying it would dominate a GPU run); the integer inputs on the host
    float_gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=float_gen, dtype=torch.float32, device=device)
    weight = torch.randn(v, d, generator=float_gen, dtype=torch.float32, device=device)
    weight.mul_(2.0 / d ** 0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored_fraction] = IGNORE_INDEX
    concepts = None
    if k > 0:
        # distinct ids != gold: gold + cumulative positive steps whose total stays below V
        max_step = max(1, (v - 1) // (k + 1))
        steps = torch.randint(1, max_step + 1, (n, k), generator=gen)
        concepts = (targets.clamp_min(0)[:, None] + steps.cumsum(1)) % v
        listed = torch.randint(1, k + 1, (n,), generator=gen)
        pad = torch.arange(k)[None, :] >= listed[:, None]
        no_concept = (torch.rand(n, generator=gen) >= content_fraction) | (targets == IGNORE_INDEX)
        pad |= no_concept[:, None]
        concepts[pad] = -1
        concepts = concepts.to(device)
    if inputs == "peaked":
        hidden = peaked_hidden(weight, targets.clamp_min(0).to(device), hidden,
                               PEAKED_SIGNAL if signal is None else signal, PEAKED_NOISE if noise is None else noise)
    elif inputs != "gaussian":
        raise ValueError(f"inputs must be one of {INPUT_KINDS}, got {inputs!r}")
    hidden = hidden.to(dtype)
    weight = weight.to(dtype)
    return hidden, weight, targets.to(device), concepts


def peaked_hidden(weight, targets, gaussian, signal, noise):
    """signal * W_y / |W_y|^2 + noise * gaussian, per row (float32, in place of `gaussian`'s values)."""
    rows = weight[targets]
    return (rows * (signal / rows.pow(2).sum(1, keepdim=True))).add_(gaussian, alpha=noise)


# --------------------------------------------------------------------------------------------
# float64 oracle, transcribed from the contract's formulas
# --------------------------------------------------------------------------------------------
def float64_loss_and_grads(hidden, weight, targets, concepts, softcap=None):
    """(loss, d_hidden, d_weight) in float64 on the CPU, straight from the contract:
    ``z = W h`` (capped), ``lse = logsumexp(z)``, ``ce = lse - z_y``, ``cl = lse - logsumexp(z[S])``,
    mean over valid rows. Gradients by float64 autograd through these formulas."""
    h = hidden.detach().to("cpu", torch.float64).requires_grad_(True)
    w = weight.detach().to("cpu", torch.float64).requires_grad_(True)
    y = targets.cpu()
    valid = y != IGNORE_INDEX
    z = h @ w.T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=1)
    ce = lse - z.gather(1, y.clamp_min(0)[:, None])[:, 0]
    rows = torch.where(valid, ce, torch.zeros_like(ce))
    if concepts is not None and concepts.shape[1] > 0:
        c = concepts.cpu()
        has_set = (c >= 0).any(1) & valid
        ids = torch.cat([c, y.clamp_min(0)[:, None]], 1)
        member = torch.cat([c >= 0, torch.ones_like(y, dtype=torch.bool)[:, None]], 1)
        set_logits = z.gather(1, ids.clamp_min(0)).masked_fill(~member, float("-inf"))
        cl = lse - torch.logsumexp(set_logits, dim=1)
        rows = rows + torch.where(has_set, cl, torch.zeros_like(cl))
    loss = rows.sum() / valid.sum().clamp_min(1)
    loss.backward()
    return loss.detach(), h.grad, w.grad


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------
def naive_concept_loss(hidden, weight, targets, concepts, softcap=None):
    """The loss the way the paper's training code computes it: full float32 logits, a float32
    softmax of them, the concept mass gathered from the probabilities, ``-log(mass)`` mixed
    with the ordinary cross-entropy. Stores several [N, V] float32 tensors for backward."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    num_valid = valid.sum().clamp_min(1)
    if concepts is None or concepts.shape[1] == 0:
        return ce.sum() / num_valid
    probs = torch.softmax(logits, dim=-1)
    ids = torch.cat([concepts, targets.clamp_min(0)[:, None]], 1)
    member = torch.cat([concepts >= 0, torch.ones_like(valid)[:, None]], 1)
    mass = (probs.gather(1, ids.clamp_min(0)) * member).sum(1)
    has_set = (concepts >= 0).any(1) & valid
    cl = torch.where(has_set, -torch.log(mass), torch.zeros_like(mass))
    return (ce.sum() + cl.sum()) / num_valid


def _package_loss(impl, kernel_options=None):
    def loss_fn(hidden, weight, targets, concepts, softcap=None):
        import fused_concept

        return fused_concept.concept_loss(hidden, weight, targets, concepts, impl=impl, softcap=softcap,
                                          kernel_options=kernel_options)

    loss_fn.__name__ = f"concept_loss_{impl}"
    return loss_fn


def _torch_chunked_lce(hidden, weight, targets, concepts, softcap=None):
    assert concepts is None and softcap is None
    return F.linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                  reduction="mean", options=torch.nn.LinearCrossEntropyOptions())


def _liger_lce(hidden, weight, targets, concepts, softcap=None):
    assert concepts is None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, softcap=softcap)(weight, hidden, targets)


def _cce_lce(hidden, weight, targets, concepts, softcap=None):
    assert concepts is None
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, softcap=softcap,
                                reduction="mean")


FLOOR_ROWS = 512


class _ThreeGemms(torch.autograd.Function):
    """Forward: z_c = h_c W^T per FLOOR_ROWS-row chunk (into one reused buffer); with gradients wanted it
    also does dH_c = z_c W and dW += z_c^T h_c there (z_c standing in for the logit gradient), so that
    forward+backward times exactly the three products; backward hands them over."""

    @staticmethod
    def forward(ctx, hidden, weight, grad_mode):
        n = hidden.shape[0]
        buf = torch.empty(min(n, FLOOR_ROWS), weight.shape[0], dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if grad_mode else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if grad_mode else None
        for lo in range(0, n, FLOOR_ROWS):
            h_c = hidden[lo:lo + FLOOR_ROWS].float()
            z = torch.mm(h_c, weight.float().t(), out=buf[:h_c.shape[0]])
            if grad_mode:
                torch.mm(z, weight.float(), out=d_hidden[lo:lo + FLOOR_ROWS])
                d_weight.addmm_(z.t(), h_c)
        ctx.grads = (d_hidden, d_weight)
        return buf[0, 0].clone()

    @staticmethod
    def backward(ctx, grad):
        d_hidden, d_weight = ctx.grads
        return d_hidden, d_weight, None


def _gemm_floor(hidden, weight, targets, concepts, softcap=None):
    return _ThreeGemms.apply(hidden, weight, torch.is_grad_enabled())


@dataclass(frozen=True)
class Implementation:
    name: str
    loss_fn: Callable
    description: str
    concepts: bool          # True: computes the concept loss; False: plain cross-entropy only
    devices: tuple          # devices it can run on
    module: Optional[str] = None  # import needed (optional extras)
    softcap: bool = True    # takes a softcap
    loss: bool = True       # False: no loss (gemm_floor); not in the float64 accuracy checks

    def unavailable_reason(self, device, softcap=None):
        """None when the implementation can run on ``device`` (with ``softcap``), else a short note why not."""
        if self.name.startswith("triton") and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            device = "cuda"  # the interpreter runs the kernels on the CPU (gpu_suite.sh --dry-run)
        if device not in self.devices:
            return f"requires {' or '.join(self.devices)}"
        if softcap is not None and not self.softcap:
            return "takes no softcap"
        if self.name == "torch_lce_chunked" and not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
        if self.module is not None:
            try:
                importlib.import_module(self.module)
            except Exception as exc:  # ImportError, or a broken install
                return f"not installed ({self.module}: {type(exc).__name__})"
        if self.name in ("reference", "torch", "auto") or self.name.startswith("triton"):
            try:
                import fused_concept  # noqa: F401

                getattr(fused_concept, "concept_loss")
            except Exception as exc:
                return f"fused_concept.concept_loss unavailable ({type(exc).__name__}: {exc})"
        return None


IMPLEMENTATIONS = {
    impl.name: impl
    for impl in [
        Implementation("naive", naive_concept_loss,
                       "paper-style: explicit fp32 logits + fp32 softmax", True, ("cpu", "cuda")),
        Implementation("reference", _package_loss("reference"),
                       "fused_concept.concept_loss(impl='reference')", True, ("cpu", "cuda")),
        Implementation("torch", _package_loss("torch"),
                       "fused_concept.concept_loss(impl='torch')", True, ("cpu", "cuda")),
        Implementation("triton", _package_loss("triton"),
                       "fused_concept.concept_loss(impl='triton')", True, ("cuda",)),
        Implementation("triton_rows", _package_loss("triton", {"strategy": "rows"}),
                       "concept_loss(impl='triton', kernel_options={'strategy': 'rows'}): row chunks, logits on "
                       "cuBLAS, one row kernel per chunk, the gradient formed in the forward (6 NDV)",
                       True, ("cuda",)),
        Implementation("auto", _package_loss("auto"),
                       "concept_loss(impl='auto'): what a user gets without choosing (the torch path on CUDA "
                       "and CPU today, see dispatch.resolve)", True, ("cpu", "cuda")),
        Implementation("triton_filter_off", _package_loss("triton", {"filter_eps": 0.0}),
                       "concept_loss(impl='triton', kernel_options={'filter_eps': 0.0}): no tile filter",
                       True, ("cuda",)),
        Implementation("torch_lce_chunked", _torch_chunked_lce,
                       "torch.nn.functional.linear_cross_entropy(options=LinearCrossEntropyOptions())",
                       False, ("cpu", "cuda"), softcap=False),
        Implementation("liger", _liger_lce,
                       "liger_kernel LigerFusedLinearCrossEntropyLoss", False, ("cuda",),
                       module="liger_kernel.transformers"),
        Implementation("cce", _cce_lce,
                       "cut_cross_entropy.linear_cross_entropy", False, ("cuda",),
                       module="cut_cross_entropy"),
        Implementation("gemm_floor", _gemm_floor,
                       f"the three float32 products of forward+backward (h W^T, dz W, dz^T h) in "
                       f"{FLOOR_ROWS}-row chunks: no loss, the floor of the chunked torch path", False,
                       ("cpu", "cuda"), loss=False),
    ]
}


def supports(impl_name, k):
    """Whether implementation ``impl_name`` computes the loss of a case with concept size k."""
    return IMPLEMENTATIONS[impl_name].concepts or k == 0
