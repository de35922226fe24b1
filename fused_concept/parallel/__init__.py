"""The concept loss with the LM head split by vocabulary rows over a ``torch.distributed`` group
(docs/distributed.md): ``vocab_parallel_concept_loss`` / ``_objective`` (``vocab.py``), DTensor heads for
tensor parallelism (``tensor.py``), and helpers for a data-parallel trunk in front of a sharded head (``data.py``)."""
from fused_concept.parallel.data import even_shard, gather_rows
from fused_concept.parallel.tensor import tensor_parallel_blocks
from fused_concept.parallel.vocab import (ShardLayout, communication_bytes, shard_layout, vocab_parallel_concept_loss,
                                          vocab_parallel_concept_objective)

__all__ = [
    "vocab_parallel_concept_loss",
    "vocab_parallel_concept_objective",
    "tensor_parallel_blocks",
    "shard_layout",
    "ShardLayout",
    "communication_bytes",
    "even_shard",
    "gather_rows",
]
