"""Prompt tuning and prefix tuning: the wrappers and model surgery (model.py) and their files
(save_load.py). The trainable pieces are lowrank.nn.prompt's SoftPrompt, PrefixEncoder and PrefixAttention.
"""

from lowrank.tuners.prompt import model, save_load
from lowrank.tuners.prompt.model import *  # noqa: F403
from lowrank.tuners.prompt.save_load import *  # noqa: F403

__all__ = [*model.__all__, *save_load.__all__]
