"""`fused_concept.hf`, the public name of the Hugging Face integration (fused_concept/integrations/hf/):
`import fused_concept.hf` and `fc.hf` give that same module object."""
import sys

from fused_concept.integrations import hf as _integration

sys.modules[__name__] = _integration
