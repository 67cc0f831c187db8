"""Functional ops. Each is a torch.library custom op with torch/cpu/triton/cuda backends."""

from lowrank.ops.adapter import adapter, adapter_reference
from lowrank.ops.grad_reverse import grad_reverse
from lowrank.ops.lora_linear import lora_linear, lora_linear_reference
from lowrank.ops.multi_lora_linear import multi_lora_linear, multi_lora_linear_reference

__all__ = [
    "adapter", "adapter_reference", "grad_reverse", "lora_linear", "lora_linear_reference", "multi_lora_linear",
    "multi_lora_linear_reference",
]
