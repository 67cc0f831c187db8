"""Fine-tuning strategies and one trainer for all of them (see strategies.py, trainer.py, multistage.py)."""

from lowrank.finetune import models, multistage, strategies, trainer
from lowrank.finetune.models import *  # noqa: F403
from lowrank.finetune.multistage import *  # noqa: F403
from lowrank.finetune.strategies import *  # noqa: F403
from lowrank.finetune.trainer import *  # noqa: F403

__all__ = [*strategies.__all__, *trainer.__all__, *multistage.__all__, *models.__all__]
