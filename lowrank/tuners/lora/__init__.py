"""LoRA as a tuning method: which layers get it (model.py), and its files in PEFT's format (save_load.py).

The layers themselves are the drop-in modules of lowrank.nn.lora, on the fused op lowrank.ops.lora_linear.
"""

from lowrank.tuners.lora import model, save_load
from lowrank.tuners.lora.model import *  # noqa: F403
from lowrank.tuners.lora.save_load import *  # noqa: F403

__all__ = [*model.__all__, *save_load.__all__]
