"""lowrank: fused LoRA, adapter and gradient-reversal kernels and drop-in modules for transfer learning."""

from lowrank import nn, ops
from lowrank._backends import backends
from lowrank.adapters import AdapterConfig, inject_adapters, load_adapters, mark_only_adapters_trainable, save_adapters
from lowrank.lora import inject_lora, mark_only_lora_trainable, merge_and_unload_lora, merge_lora, unmerge_lora
from lowrank.peft_io import load_adapter, save_adapter
from lowrank.prompt_io import load_prompt, mark_only_prompt_trainable, save_prompt
from lowrank.prompt_tuning import PrefixTuningModel, PromptTuningModel, prefix_tuning, prompt_tuning

__version__ = "0.1.0"

__all__ = [
    "backends",
    "ops",
    "nn",
    "inject_lora",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unload_lora",
    "mark_only_lora_trainable",
    "save_adapter",
    "load_adapter",
    "AdapterConfig",
    "inject_adapters",
    "mark_only_adapters_trainable",
    "save_adapters",
    "load_adapters",
    "PromptTuningModel",
    "PrefixTuningModel",
    "prompt_tuning",
    "prefix_tuning",
    "mark_only_prompt_trainable",
    "save_prompt",
    "load_prompt",
    "__version__",
]
