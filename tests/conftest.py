import os

import torch

# The Triton kernels run in Triton's interpreter on machines without CUDA; this must be set before
# any @triton.jit function is defined, i.e. before the kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
