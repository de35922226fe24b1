"""Tensor parallel in the torchtitan style: a head weight that is a DTensor sharded ``Shard(0)`` (vocabulary
rows) over a 1-D device mesh runs the vocab-parallel loss on the mesh's process group."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from fused_concept.core.options import LossOptions
from fused_concept.parallel import vocab


def _fsdp_hint(weight) -> str:
    return (f"concept_loss got weight as a DTensor (placements {tuple(weight.placements)}) but hidden as a plain "
            "tensor. If FSDP2's fully_shard sharded the head, the weight is gathered only inside the head module's "
            "own forward: call fused_concept.fuse_head(head) once and compute the loss as head(hidden, targets, "
            "concepts) (fused_concept.hf.patch does this for transformers models). Do not pass "
            "weight.full_tensor(): its backward keeps each rank's slice of its own gradient without summing over "
            "the data-parallel ranks. For a tensor-parallel head (vocabulary rows sharded with Shard(0)), pass "
            "hidden as a DTensor on the weight's device mesh.")


def tensor_parallel_blocks(hidden, weight, bias):
    """(hidden, weight block, bias block, group) for `vocab_parallel_concept_loss` from DTensors: `weight`
    (and `bias`) sharded Shard(0) over a 1-D device mesh, `hidden` a DTensor on that mesh (replicated, or
    sharded: it is all-gathered). Gradients flow back as DTensors with the inputs' placements: each rank's
    block of d_weight, and d_hidden (the same on every rank after the loss's all-reduce). Raises ValueError
    naming the fix for any other layout, e.g. an FSDP2-sharded weight passed directly."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(weight, DTensor):
        raise ValueError("hidden is a DTensor but weight is not; pass the head weight as a DTensor sharded "
                         "Shard(0) over the same device mesh (tensor parallel) or hidden as a plain tensor")
    if not isinstance(hidden, DTensor):
        raise ValueError(_fsdp_hint(weight))
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"a DTensor weight must be sharded Shard(0) (vocabulary rows) over a 1-D device mesh, got "
                         f"placements {tuple(weight.placements)} over a {mesh.ndim}-D mesh")
    if hidden.device_mesh != mesh:
        raise ValueError("hidden and weight are DTensors on different device meshes")
    if bias is not None and (not isinstance(bias, DTensor) or bias.device_mesh != mesh
                             or tuple(bias.placements) != (Shard(0),)):
        raise ValueError("bias must be None or a DTensor sharded Shard(0) over the weight's device mesh")
    hidden = hidden.redistribute(mesh, [Replicate()]).to_local()
    return hidden, weight.to_local(), None if bias is None else bias.to_local(), mesh.get_group()


def tensor_parallel_loss(hidden, weight, targets: Tensor, concepts: Optional[Tensor], *, bias, concept_probs,
                         options: LossOptions, impl: str, return_stats: bool):
    """The loss of a DTensor head (`concept_loss` routes here): the vocab-parallel loss on the mesh's group,
    over this rank's block of the head (`tensor_parallel_blocks`)."""
    hidden, weight, bias, group = tensor_parallel_blocks(hidden, weight, bias)
    return vocab.loss_with_options(hidden, weight, targets, concepts, group=group, bias=bias,
                                   concept_probs=concept_probs, options=options, impl=impl, return_stats=return_stats)
