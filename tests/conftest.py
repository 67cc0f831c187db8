import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The
# variable must be set before triton is imported, so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
