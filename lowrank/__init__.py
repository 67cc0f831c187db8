"""lowrank: fused LoRA kernels and drop-in modules for transfer learning in PyTorch."""

from lowrank._backends import backends
from lowrank import ops
from lowrank.adapters import AdapterConfig, inject_adapters, load_adapters, mark_only_adapters_trainable, save_adapters
from lowrank.lora import inject_lora, mark_only_lora_trainable, merge_lora, unmerge_lora
from lowrank.peft_io import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "backends",
    "ops",
    "inject_lora",
    "merge_lora",
    "unmerge_lora",
    "mark_only_lora_trainable",
    "save_adapter",
    "load_adapter",
    "AdapterConfig",
    "inject_adapters",
    "mark_only_adapters_trainable",
    "save_adapters",
    "load_adapters",
    "__version__",
]
