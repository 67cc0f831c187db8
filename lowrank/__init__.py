"""lowrank: fused LoRA kernels and drop-in modules for transfer learning in PyTorch."""

from lowrank._backends import backends
from lowrank import ops

__version__ = "0.1.0"

__all__ = ["backends", "ops", "__version__"]
