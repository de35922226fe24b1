"""Vocab-parallel concept loss: the LM head split by vocabulary rows over a torch.distributed group.

Rank r of the group holds the contiguous block of head rows (and bias entries) that follows the
blocks of ranks 0..r-1; blocks may have any sizes (they are exchanged at every call, never
assumed). `hidden`, `targets`, `concepts` (and every per-row option) are replicated: the same on
every rank, with GLOBAL token ids. The result is the single-device `concept_loss` on the whole head.

How one call runs (the three steps of docs/internals.md, with two merges in between):

  0. layout: one all_gather of a few integers per rank (shard size, D, N, K, bias length, dtype),
     so every rank knows `vocab_start` (sum of the sizes of lower ranks) and the global vocabulary
     size V, against which the ids are validated; a rank-specific mismatch raises on EVERY rank.
  1. each rank computes its shard statistics with the single-device code path
     (`torch_partial_stats` / `triton_partial_stats` with `vocab_start`). Ids that lie in another
     rank's block are masked by that path: they contribute nothing here and never index a column.
  2. merge, two all-reduces of packed [N] vectors:
       MAX (int64): key_i = order(max_i) * 2**32 + (2**32 - 1 - argmax_i), and order(set_lse_i)
                    `order` maps a float32 to an int32 with the same ordering, so the winning key
                    carries the global max exactly AND the lowest global id among the ranks that
                    hold it (ties break towards the lower id, as on one device).
       SUM (fp32):  exp(lse_r - max), exp(set_lse_r - set_max) (0 for -inf), target_logit, soft_dot
                    then lse = max + log(sum), set_lse = set_max + log(sum) (-inf stays -inf, no NaN).
     `_rowmath.row_terms` turns the merged statistics into the row losses, identical on every rank.
  3. backward (`torch.autograd.Function`): `*_shard_grads` with the GLOBAL lse / set_lse gives this
     shard's d_weight / d_bias (kept local) and a partial d_hidden that is all-reduced (SUM, fp32),
     so every rank ends with the same full d_hidden.

Bytes all-reduced per call (N rows, D hidden size; independent of V, K and the world size):
  forward MAX 8*N (+8*N when K > 0), forward SUM 4*N per field (lse, target logit; + set when K > 0;
  + soft dot in soft mode), backward 4*N*D when hidden needs a gradient: 28*N + 4*N*D for the paper's
  setting. `communication_bytes` states it; docs/distributed.md has the measurement.

Every rank must make the same calls in the same order (forward, and backward when hidden requires a
gradient on every rank); `hidden.requires_grad` must agree across ranks.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fused_concept import backends  # noqa: F401  (registers the backends with the seam)
from fused_concept.core import dispatch
from fused_concept.core.inputs import Canonical, prepare
from fused_concept.core.objective import objective_options
from fused_concept.core.options import LossOptions
from fused_concept.core.outputs import ConceptStats, finish
from fused_concept.core.rowmath import Needs, ShardStats, grad_coefficients, reduce_rows, row_terms

_TWO32 = 1 << 32
_LOW32 = _TWO32 - 1
_FLIP = 0x7FFFFFFF
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}


class ShardLayout(NamedTuple):
    """Where this rank's block of the head sits in the global vocabulary."""

    rank: int  # rank within the group
    sizes: tuple  # rows held by each rank of the group, in rank order
    vocab_start: int  # first global id of this rank's block
    vocab_size: int  # V = sum(sizes)


# ----------------------------------------------------------------------------------------------
# step 0: the layout exchange
# ----------------------------------------------------------------------------------------------

def _group_rank(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_concept_loss needs an initialised torch.distributed process group")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group passed as `group`")
    return rank


def _describe(hidden: Tensor, weight: Tensor, bias, targets, concepts) -> list:
    """The integers each rank publishes: [shard rows, D, rows of hidden, K, bias length, dtype]."""
    rows = -1
    if isinstance(hidden, Tensor) and hidden.dim() >= 2:
        rows = math.prod(hidden.shape[:-1])
    matrix = isinstance(weight, Tensor) and weight.dim() == 2
    return [
        weight.shape[0] if matrix else -1,
        weight.shape[1] if matrix else -1,
        rows,
        concepts.shape[-1] if isinstance(concepts, Tensor) and concepts.dim() > 0 else -1,
        bias.shape[0] if isinstance(bias, Tensor) and bias.dim() == 1 else (-1 if bias is None else -2),
        _DTYPE_CODES.get(weight.dtype, 0) if matrix else 0,
    ]


def _check_table(table: list) -> None:
    """Raise the same error on every rank when the published descriptions disagree."""
    names = ("weight_shard rows", "weight_shard's hidden size D", "rows of hidden", "concepts' K",
             "bias length", "weight dtype")
    for r, row in enumerate(table):
        if row[0] < 0:
            raise ValueError(f"weight_shard on rank {r} of the group must be a 2-D tensor [V_shard, D]")
    for col in (1, 2, 3, 5):
        values = [row[col] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"{names[col]} differs across the ranks of the group: {values} "
                             f"(hidden, targets and concepts must be replicated, the head split by rows)")
    for r, row in enumerate(table):
        if row[4] == -1 and any(other[4] != -1 for other in table):
            raise ValueError(f"bias is None on rank {r} but given on other ranks of the group")
        if row[4] not in (-1, row[0]):
            raise ValueError(f"bias on rank {r} must be [{row[0]}] to match its weight_shard, "
                             f"got length {row[4]}")


def _exchange(hidden, weight, bias, targets, concepts, group) -> ShardLayout:
    rank = _group_rank(group)
    world = dist.get_world_size(group)
    device = hidden.device if isinstance(hidden, Tensor) else None
    mine = torch.tensor(_describe(hidden, weight, bias, targets, concepts), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = [t.tolist() for t in every]
    _check_table(table)
    sizes = tuple(row[0] for row in table)
    return ShardLayout(rank=rank, sizes=sizes, vocab_start=sum(sizes[:rank]), vocab_size=sum(sizes))


def shard_layout(weight_shard: Tensor, *, group=None) -> ShardLayout:
    """Exchange the shard sizes over `group` (a collective: call it on every rank) and return this
    rank's `ShardLayout` (rank, sizes, vocab_start, vocab_size)."""
    return _exchange(weight_shard.new_zeros(1, weight_shard.shape[-1]), weight_shard, None, None, None, group)


# ----------------------------------------------------------------------------------------------
# step 2: merging shard statistics across ranks
# ----------------------------------------------------------------------------------------------

def _order_key(x: Tensor) -> Tensor:
    """float32 -> int64 holding an int32 whose integer order is the float order (-0.0 taken as +0.0)."""
    bits = (x.float() + 0.0).view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ _FLIP).long()


def _from_key(key: Tensor) -> Tensor:
    """Inverse of `_order_key` (the map is an involution on the int32 bits)."""
    k32 = key.to(torch.int32)
    return torch.where(k32 >= 0, k32, k32 ^ _FLIP).view(torch.float32)


def _log_sum_shifted(shift: Tensor, parts: Tensor) -> Tensor:
    return shift + torch.log(parts)


def _merge_across_ranks(stats: ShardStats, group, *, with_set: bool, with_soft: bool,
                        with_logit_sum: bool = False) -> ShardStats:
    """Turn each rank's shard statistics into those of the whole vocabulary (same on every rank):
    one MAX all-reduce (packed int64 keys) and one SUM all-reduce (packed float32)."""
    n = stats.max.shape[0]
    max_key = _order_key(stats.max) * _TWO32 + (_LOW32 - stats.argmax)
    packed = [max_key]
    if with_set:
        packed.append(_order_key(stats.set_lse))
    keys = torch.cat(packed)
    dist.all_reduce(keys, op=dist.ReduceOp.MAX, group=group)
    top_key = keys[:n]
    gmax = _from_key(torch.div(top_key, _TWO32, rounding_mode="floor"))
    argmax = _LOW32 - torch.remainder(top_key, _TWO32)

    # shift by the global maxima; only an all -inf row (set: no set id anywhere) needs a finite shift
    shift = torch.where(gmax == float("-inf"), torch.zeros_like(gmax), gmax)
    sums = [torch.exp(stats.lse.float() - shift)]
    if with_set:
        gset = _from_key(keys[n:])
        set_shift = torch.where(gset == float("-inf"), torch.zeros_like(gset), gset)
        set_part = torch.exp(stats.set_lse.float() - set_shift)
        sums.append(torch.where(stats.set_lse == float("-inf"), torch.zeros_like(set_part), set_part))
    sums.append(stats.target_logit.float())
    if with_soft:
        sums.append(stats.soft_dot.float())
    if with_logit_sum:
        sums.append(stats.logit_sum.float())
    total = torch.cat(sums)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    fields = iter(total.view(len(sums), n).unbind(0))  # (not split(n): no field at all when n = 0)
    lse = _log_sum_shifted(shift, next(fields))
    set_lse = _log_sum_shifted(set_shift, next(fields)) if with_set else torch.full_like(lse, float("-inf"))
    target_logit = next(fields)
    soft_dot = next(fields) if with_soft else torch.zeros_like(lse)
    logit_sum = next(fields) if with_logit_sum else None
    return ShardStats(max=gmax, argmax=argmax, lse=lse, target_logit=target_logit, set_lse=set_lse,
                      soft_dot=soft_dot, logit_sum=logit_sum)


def communication_bytes(n: int, d: int, *, has_sets: bool = True, soft: bool = False,
                        hidden_grad: bool = True, label_smoothing: bool = False) -> dict:
    """Bytes all-reduced by one forward (+ backward) of `vocab_parallel_concept_loss`, per rank's
    buffer (what each all-reduce call is given; a ring all-reduce moves about twice that over the
    wire per rank). Independent of V, K and the world size. `has_sets`: concepts with K > 0; `label_smoothing`:
    a label_smoothing > 0 adds the sum of each row's logits to the forward SUM."""
    max_bytes = 8 * n * (2 if has_sets else 1)
    sum_bytes = 4 * n * (2 + int(has_sets) + int(soft) + int(label_smoothing))
    backward = 4 * n * d if hidden_grad else 0
    return {"forward_max": max_bytes, "forward_sum": sum_bytes, "backward_hidden": backward,
            "total": max_bytes + sum_bytes + backward}


# ----------------------------------------------------------------------------------------------
# steps 1 and 3 on this rank's block, wired to autograd
# ----------------------------------------------------------------------------------------------

def _backend_for(impl: str, device: torch.device) -> dispatch.Backend:
    which = dispatch.resolve(impl, device)
    if which == "reference":
        raise ValueError('impl="reference" materialises the whole head on one device; '
                         'vocab_parallel_concept_loss supports "auto", "torch" and "triton"')
    return dispatch.get(which)


class _VocabParallelRows(torch.autograd.Function):
    """Row losses of the sharded head; differentiable in hidden, weight_shard and bias_shard."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, canon: Canonical, backend: dispatch.Backend, group):
        local = backend.partial_stats(canon)
        merged = _merge_across_ranks(local, group, with_set=canon.set_ids.shape[1] > 0, with_soft=canon.soft,
                                     with_logit_sum=canon.label_smoothing > 0)
        terms = row_terms(merged, canon)
        ctx.canon, ctx.backend, ctx.group = canon, backend, group
        ctx.merged, ctx.hinge = merged, terms.hinge
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ce, mass, lse, argmax = terms.ce, terms.mass, merged.lse, merged.argmax
        ctx.mark_non_differentiable(ce, mass, lse, argmax)
        return terms.loss, lse, ce, mass, argmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows, *unused):
        canon = ctx.canon
        wants = ctx.needs_input_grad
        needs = Needs(hidden=wants[0], weight=wants[1], bias=wants[2] and canon.bias is not None)
        if not needs.any:
            return (None,) * 6
        grad = grad_coefficients(grad_rows.float(), canon, lse=ctx.merged.lse, set_lse=ctx.merged.set_lse,
                                 hinge=ctx.hinge)
        grads = ctx.backend.shard_grads(canon, grad, needs, {})
        d_hidden = None
        if needs.hidden:  # every rank holds a partial sum over its ids: all-reduce it
            d_hidden = grads.hidden.float().contiguous()
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        out = [None if g is None else g.to(dt) for g, dt in zip((d_hidden, grads.weight, grads.bias), ctx.dtypes)]
        return out[0], out[1], out[2], None, None, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

def vocab_parallel_concept_loss(hidden: Tensor, weight_shard: Tensor, targets: Tensor,
                                concepts: Optional[Tensor] = None, *, group=None, bias: Optional[Tensor] = None,
                                concept_probs: Optional[Tensor] = None, impl: str = "auto",
                                return_stats: bool = False, **options):
    """`fused_concept.concept_loss` with the head split by vocabulary rows over `group`.

    `weight_shard` [V_r, D] (and `bias` [V_r], this rank's slice of the bias) holds global ids
    `vocab_start .. vocab_start + V_r - 1`, where vocab_start is the sum of the block sizes of the
    lower ranks of `group` (None: the default group). Everything else is replicated and uses global
    ids; ids are validated against V = sum of the block sizes. `options` are concept_loss's loss keywords
    (`LossOptions`: ntp_weight, concept_weight, margin, mode, include_target, ignore_index, reduction, softcap,
    z_loss, label_smoothing, shift); the loss and the statistics (global lse, ce, mass, argmax) are the same
    on every rank. Backward: d_hidden is all-reduced (the same on every rank), d_weight_shard / d_bias stay local.
    """
    return loss_with_options(hidden, weight_shard, targets, concepts, group=group, bias=bias,
                             concept_probs=concept_probs, options=LossOptions(**options), impl=impl,
                             return_stats=return_stats)


def loss_with_options(hidden: Tensor, weight_shard: Tensor, targets: Tensor, concepts: Optional[Tensor], *, group,
                      bias: Optional[Tensor], concept_probs: Optional[Tensor], options: LossOptions, impl: str,
                      return_stats: bool):
    """`vocab_parallel_concept_loss` with its loss keywords as one `LossOptions`."""
    layout = _exchange(hidden, weight_shard, bias, targets, concepts, group)
    # the replicated inputs are validated against the global V; this rank's block may hold no rows
    canon = prepare(hidden, weight_shard, targets, concepts, bias=bias, concept_probs=concept_probs, options=options,
                    vocab_size=layout.vocab_size, vocab_start=layout.vocab_start)
    backend = _backend_for(impl, hidden.device)
    rows, *stats = _VocabParallelRows.apply(canon.hidden, weight_shard, bias, canon, backend, group)
    loss = reduce_rows(rows, canon.valid, options.reduction)
    return finish(loss, ConceptStats(*stats), canon, reduction=options.reduction, return_stats=return_stats)


def vocab_parallel_concept_objective(hidden: Tensor, weight_shard: Tensor, targets: Tensor, concepts: Tensor,
                                     *, group=None, lam: float = 0.5, margin: Optional[float] = 0.6,
                                     ignore_index: int = -100, num_valid: Optional[int] = None,
                                     num_content: Optional[int] = None, bias: Optional[Tensor] = None,
                                     impl: str = "auto", return_stats: bool = False, **options):
    """`fused_concept.concept_objective` (the paper's objective, docs/math.md "The paper's objective") with
    the head split over `group`: the per-row weights of `core.objective.paper_weights` and reduction "sum".
    `num_valid` / `num_content` override the local counts N_v and |T| (pass global counts when the batch
    itself is split across data-parallel ranks)."""
    loss_options = objective_options("vocab_parallel_concept_objective", "vocab_parallel_concept_loss", targets,
                                     concepts, lam=lam, margin=margin, ignore_index=ignore_index,
                                     num_valid=num_valid, num_content=num_content, options=options)
    return loss_with_options(hidden, weight_shard, targets, concepts, group=group, bias=bias, concept_probs=None,
                             options=loss_options, impl=impl, return_stats=return_stats)
