"""fused-concept: the concept loss (Learning Concepts, Not Tokens) fused with the LM head, so the
[tokens x vocab] logits never exist in memory. See docs/math.md for the exact definition."""
from .loss import ConceptLoss, ConceptStats, concept_loss, concept_objective

__all__ = ["concept_loss", "concept_objective", "ConceptLoss", "ConceptStats"]
__version__ = "0.1.0"
