"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) as a tuning method: where they go (model.py) and
their files (save_load.py). Each adapter is a lowrank.nn.Adapter on the fused op lowrank.ops.adapter.
"""

from lowrank.tuners.bottleneck import model, save_load
from lowrank.tuners.bottleneck.model import *  # noqa: F403
from lowrank.tuners.bottleneck.save_load import *  # noqa: F403

__all__ = [*model.__all__, *save_load.__all__]
