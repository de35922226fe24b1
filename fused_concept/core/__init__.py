"""The loss's core, shared by every implementation (docs/internals.md): options and canonical inputs
(``options.py``, ``inputs.py``), the row math (``rowmath.py``), the paper's row weights (``objective.py``),
the backend seam (``dispatch.py``), the registered custom ops (``ops.py``), the naive reference
(``reference.py``) and the returned statistics (``outputs.py``). Imports torch only."""
