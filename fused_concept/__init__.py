"""fused-concept: the concept loss (Learning Concepts, Not Tokens) fused with the LM head, so the
[tokens x vocab] logits never exist in memory. See docs/math.md for the exact definition."""
import importlib

from ._fused_head import fuse_head, unfuse_head
from .loss import ConceptLoss, ConceptStats, concept_loss, concept_objective

__all__ = ["concept_loss", "concept_objective", "ConceptLoss", "ConceptStats", "fuse_head", "unfuse_head"]
__version__ = "0.1.0"

# submodules with heavier dependencies (transformers, torch.distributed) load on first use
_LAZY_SUBMODULES = ("concepts", "distributed", "hf", "train")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
