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

from lowrank.tuners import bottleneck, lora, prompt
from lowrank.tuners.bottleneck import *  # noqa: F403
from lowrank.tuners.lora import *  # noqa: F403
from lowrank.tuners.prompt import *  # noqa: F403

__all__ = [*lora.__all__, *bottleneck.__all__, *prompt.__all__]
