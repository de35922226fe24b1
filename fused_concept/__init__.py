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
    """In a checkout (plain, or installed in editable mode), `fused_concept.kernels` is the top-level
    `kernels/` folder next to this package, which setup.py installs as `fused_concept.kernels`. Registered
    here, before anything imports it, so each checkout (a git worktree too) runs its own kernels; importing
    the package does not import Triton. An installed package has the subpackage itself."""
    name = __name__ + ".kernels"
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folder = os.path.join(root, "kernels")
    init = os.path.join(folder, "__init__.py")
    checkout = os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(init)
    if name in sys.modules or os.path.isdir(os.path.join(here, "kernels")) or not checkout:
        return
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
_LAZY = {"hf": "fused_concept.hf", "parallel": "fused_concept.parallel",
         "concepts": "fused_concept.training.concepts", "training": "fused_concept.training"}


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
