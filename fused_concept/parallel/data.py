"""A data-parallel trunk with a vocab-parallel head: which head rows a rank owns, and gathering every rank's
hidden rows (differentiably) before the vocab-parallel loss. Helpers for training loops."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def even_shard(num_rows: int, rank: int, world: int) -> slice:
    """The contiguous block of `num_rows` head rows owned by `rank` of `world`: sizes differ by at most
    one, lower ranks larger (any split works with this module; this one is the usual choice)."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class _GatherRows(torch.autograd.Function):
    """All-gather equal-sized row blocks [n, D] -> [world * n, D] in rank order. The backward keeps this
    rank's block of the incoming gradient: the vocab-parallel loss already all-reduces d_hidden, so every
    rank holds the full gradient of the gathered rows."""

    @staticmethod
    def forward(ctx, rows, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        blocks = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(blocks, rows.contiguous(), group=group)
        ctx.block = (rank * rows.shape[0], rows.shape[0])
        return torch.cat(blocks)

    @staticmethod
    def backward(ctx, grad):
        start, n = ctx.block
        return grad[start : start + n], None


def gather_rows(rows: Tensor, group=None) -> Tensor:
    """[n, D] on each rank -> [world * n, D] (rank order), differentiable for use before a vocab-parallel
    loss: the gradient each rank gets back is its own block of the (already all-reduced) d_hidden."""
    return _GatherRows.apply(rows, group)
