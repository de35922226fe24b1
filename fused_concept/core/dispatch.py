"""The backend seam: every implementation that never stores [N, V] logits offers the same three steps
of docs/internals.md over one vocabulary shard (`canon.weight`, global ids from `canon.vocab_start`):

    partial_stats(canon)                       -> ShardStats      (step 1)
    shard_grads(canon, grad, needs, **opts)    -> ShardGrads      (step 3, from the merged statistics)
    stats_and_grads(canon, row_scale, needs, options) -> (ShardStats, ShardGrads)   optional: both in one
                                                  sweep, for a device that holds the whole vocabulary (the
                                                  torch path always; Triton with strategy="rows")

`resolve(impl, device)` turns the user's `impl=` into a backend name and holds the one device guard.
The single-device loss (loss.py) and the vocab-parallel loss (distributed.py) both go through here.
"impl='reference'" is not a backend: it materialises the logits and lets autograd differentiate them.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from fused_concept.core.inputs import Canonical
from fused_concept.core.rowmath import Needs, RowGrad, ShardGrads, ShardStats, empty_shard_stats, nonfinite_rows, poison_stats

IMPLS = ("auto", "reference", "torch", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    _partial_stats: Callable[..., ShardStats]
    _shard_grads: Callable[..., ShardGrads]
    _stats_and_grads: Optional[Callable[..., Tuple[ShardStats, ShardGrads]]] = None
    kernel_options: Tuple[str, ...] = ()  # keyword switches its shard_grads accepts (concept_loss's kernel_options)
    # options -> whether those kernel_options make it fuse (None: always, when _stats_and_grads is given)
    _fuses_with: Optional[Callable[[dict], bool]] = None
    # options -> None, raising ValueError for a bad value or combination (before the unknown-key check, so
    # that a renamed key can say its new name)
    check_options: Optional[Callable[[dict], None]] = None

    def fuses(self, options: dict) -> bool:
        """Whether, with these kernel_options, it forms the gradient of a summed loss during the forward sweep."""
        if self._stats_and_grads is None:
            return False
        return self._fuses_with is None or self._fuses_with(options)

    def partial_stats(self, canon: Canonical) -> ShardStats:
        if canon.weight.shape[0] == 0:
            stats = empty_shard_stats(canon.num_rows, canon.hidden.device, logit_sum=canon.label_smoothing > 0)
        else:
            stats = self._partial_stats(canon)
        # the non-finite policy (docs/math.md), applied per shard so that merging spreads it to every rank
        return poison_stats(stats, nonfinite_rows(canon))

    def shard_grads(self, canon: Canonical, grad: RowGrad, needs: Needs, options: dict) -> ShardGrads:
        if canon.weight.shape[0] == 0:  # a shard with no rows adds nothing
            d_hidden = torch.zeros(canon.hidden.shape, dtype=torch.float32, device=canon.hidden.device)
            return ShardGrads(d_hidden if needs.hidden else None,
                              torch.zeros_like(canon.weight) if needs.weight else None,
                              torch.zeros_like(canon.bias) if needs.bias and canon.bias is not None else None)
        return self._shard_grads(canon, grad, needs, **options)

    def stats_and_grads(self, canon: Canonical, *, row_scale: Tensor, needs: Needs, options: Optional[dict] = None):
        # the non-finite policy: a NaN scale gives the hit rows a NaN logit gradient, as the recomputing
        # backward gets from their NaN lse (a saturated softcap would otherwise keep it finite)
        bad = nonfinite_rows(canon)
        row_scale = torch.where(bad, torch.full_like(row_scale, float("nan")), row_scale)
        stats, grads = self._stats_and_grads(canon, row_scale=row_scale, needs=needs, **(options or {}))
        return poison_stats(stats, bad), grads


_FACTORIES: Dict[str, Callable[[], Backend]] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Make backend `name` available to `get` (`fused_concept.backends` registers "torch" and "triton";
    the factory imports its module on first use)."""
    _FACTORIES[name] = factory


# looked up once: torch.compile cannot trace importlib (torch 2.11 breaks the graph on find_spec)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(impl: str, device: torch.device, *, kernel_options: Optional[dict] = None) -> str:
    """The implementation `impl` means for tensors on `device`. Raises ValueError for an unknown name or a
    backend the device cannot run.

    "auto" is "torch": on the H200 (benchmarks/results/2026-11-29-h200-2) the torch path ran forward +
    backward 1.45x to 2.3x faster than the Triton kernels in every class measured (bf16, N x D x V from
    4096 x 576 x 49152 to 16384 x 4096 x 256000, trainable and frozen head); the Triton kernels hold less
    (258 MiB against 2263 MiB transient at Llama-3-8B), so choose impl="triton" when memory is what binds.
    "auto" with kernel_options (Triton's switches) is "triton" where Triton can run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        runs_triton = triton_available() and (device.type == "cuda" or interpreting())
        return "triton" if kernel_options and runs_triton else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError('impl="triton" needs the triton package (pip install triton)')
        if device.type != "cuda" and not interpreting():
            raise ValueError('impl="triton" needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)')
    return impl


def check_kernel_options(name: str, options: Optional[dict]) -> dict:
    """`options` (concept_loss's kernel_options) checked against what backend `name` accepts."""
    options = dict(options or {})
    backend = _FACTORIES[name]() if name in _FACTORIES else None
    known = backend.kernel_options if backend is not None else ()
    if options and not known:
        raise ValueError(f'kernel_options apply to impl="triton" only, but impl resolved to {name!r}')
    if options and backend.check_options is not None:
        backend.check_options(options)
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"unknown kernel_options {sorted(unknown)}; known: {list(known)}")
    return options


def get(name: str) -> Backend:
    """The backend for a resolved name ("torch" or "triton")."""
    if name not in _FACTORIES:
        raise ValueError(f"{name!r} is not a backend (backends: {sorted(_FACTORIES)})")
    return _FACTORIES[name]()
