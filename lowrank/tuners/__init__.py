"""Tuning methods, one folder each (as HF PEFT): lora/, bottleneck/ (adapters), prompt/ (prompt and prefix tuning).

Each folder has model.py (what the method puts into a model) and save_load.py (its files), and
every method's functions follow one naming convention:

    inject_<method>(model, ...)             put the method's modules into an existing model, in place
    mark_only_<method>_trainable(model)     freeze everything else
    save_<method>(model, directory)         write only the method's weights (safetensors) and config
    load_<method>(model, directory)         read them back, adding the modules where they are missing

Prompt and prefix tuning wrap a Hugging Face model instead of injecting into it: prompt_tuning and
prefix_tuning return the wrapper. The modules themselves live in lowrank.nn.
"""

from lowrank.tuners.bottleneck import (
    BottleneckConfig,
    bottleneck_adapters,
    inject_bottleneck,
    load_bottleneck,
    mark_only_bottleneck_trainable,
    save_bottleneck,
)
from lowrank.tuners.lora import (
    LoRAConfig,
    inject_lora,
    load_lora,
    lora_layers,
    mark_only_lora_trainable,
    merge_and_unload_lora,
    merge_lora,
    save_lora,
    unmerge_lora,
)
from lowrank.tuners.prompt import (
    PrefixTuningModel,
    PromptTuningModel,
    inject_prefix_attention,
    inject_soft_prompt,
    load_prompt,
    mark_only_prompt_trainable,
    prefix_tuning,
    prompt_modules,
    prompt_tuning,
    save_prompt,
)

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
    "BottleneckConfig",
    "inject_bottleneck",
    "bottleneck_adapters",
    "mark_only_bottleneck_trainable",
    "save_bottleneck",
    "load_bottleneck",
    "PromptTuningModel",
    "PrefixTuningModel",
    "prompt_tuning",
    "prefix_tuning",
    "inject_soft_prompt",
    "inject_prefix_attention",
    "prompt_modules",
    "mark_only_prompt_trainable",
    "save_prompt",
    "load_prompt",
]
