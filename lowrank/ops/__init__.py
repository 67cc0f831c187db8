"""Functional ops. Each is a torch.library custom op with torch/cpu/triton/cuda backends."""

from lowrank.ops.adapter import adapter, adapter_reference
from lowrank.ops.dora_linear import (
    WeightNormCache,
    dora_linear,
    dora_linear_reference,
    dora_magnitude,
    dora_merged_weight,
    dora_unmerged_weight,
    weight_row_norm_sq,
)
from lowrank.ops.grad_reverse import grad_reverse
from lowrank.ops.lora_linear import lora_linear, lora_linear_reference
from lowrank.ops.multi_lora_linear import multi_lora_linear, multi_lora_linear_reference

__all__ = [
    "adapter",
    "adapter_reference",
    "dora_linear",
    "dora_linear_reference",
    "dora_magnitude",
    "dora_merged_weight",
    "dora_unmerged_weight",
    "WeightNormCache",
    "weight_row_norm_sq",
    "grad_reverse",
    "lora_linear",
    "lora_linear_reference",
    "multi_lora_linear",
    "multi_lora_linear_reference",
]
