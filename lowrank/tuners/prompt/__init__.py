"""Prompt tuning and prefix tuning: the wrappers and model surgery (model.py) and their files
(save_load.py). The trainable pieces are lowrank.nn.prompt's SoftPrompt, PrefixEncoder and PrefixAttention.
"""

from lowrank.tuners.prompt.model import (
    PrefixTuningModel,
    PromptTuningModel,
    inject_prefix_attention,
    inject_soft_prompt,
    prefix_tuning,
    prompt_tuning,
)
from lowrank.tuners.prompt.save_load import load_prompt, mark_only_prompt_trainable, prompt_modules, save_prompt

__all__ = [
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
