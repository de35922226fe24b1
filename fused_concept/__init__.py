"""fused-concept: the concept loss (Learning Concepts, Not Tokens) fused with the LM head, so the
[tokens x vocab] logits never exist in memory. See docs/math.md for the exact definition.

The library: `concept_loss`, `concept_objective`, `ConceptLoss` (loss.py), `fuse_head` (fused_head.py), and the
subpackages `core`, `backends`, `parallel`, `integrations`. The paper's application (training, concept sets,
evaluation) is `fused_concept.training`; nothing in the library imports it.
"""
import importlib
import importlib.util
import os
import sys


def _link_checkout_kernels() -> None:
    """In a plain checkout (no install), `fused_concept.kernels` is the top-level `kernels/` folder, which
    setup.py installs as `fused_concept.kernels`. Registered here, before anything imports it; importing
    the package does not import Triton."""
    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_link_checkout_kernels()

from fused_concept.core.inputs import content_rows  # noqa: E402
from fused_concept.fused_head import fuse_head, unfuse_head  # noqa: E402
from fused_concept.loss import ConceptLoss, ConceptStats, concept_loss, concept_objective  # noqa: E402

__all__ = ["concept_loss", "concept_objective", "ConceptLoss", "ConceptStats", "fuse_head", "unfuse_head", "content_rows"]
__version__ = "0.1.0"

# subpackages with heavier dependencies load on first use: `fc.hf` (transformers), `fc.parallel`
# (torch.distributed), and the application's `fc.concepts` / `fc.training`
_LAZY = {"hf": "fused_concept.integrations.hf", "parallel": "fused_concept.parallel",
         "concepts": "fused_concept.training.concepts", "training": "fused_concept.training"}


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
