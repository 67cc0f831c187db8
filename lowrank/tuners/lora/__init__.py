"""LoRA as a tuning method: which layers get it (model.py), and its files in PEFT's format (save_load.py).

The layers themselves are the drop-in modules of lowrank.nn.lora, on the fused op lowrank.ops.lora_linear.
"""

from lowrank.tuners.lora.model import (
    LoRAConfig,
    inject_lora,
    lora_layers,
    mark_only_lora_trainable,
    merge_and_unload_lora,
    merge_lora,
    unmerge_lora,
)
from lowrank.tuners.lora.save_load import load_lora, save_lora

__all__ = [
    "LoRAConfig",
    "inject_lora",
    "lora_layers",
    "mark_only_lora_trainable",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unload_lora",
    "save_lora",
    "load_lora",
]
