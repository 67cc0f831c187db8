"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) as a tuning method: where they go (model.py) and
their files (save_load.py). Each adapter is a lowrank.nn.Adapter on the fused op lowrank.ops.adapter.
"""

from lowrank.tuners.bottleneck.model import (
    BottleneckConfig,
    bottleneck_adapters,
    inject_bottleneck,
    mark_only_bottleneck_trainable,
)
from lowrank.tuners.bottleneck.save_load import load_bottleneck, save_bottleneck

__all__ = [
    "BottleneckConfig",
    "inject_bottleneck",
    "bottleneck_adapters",
    "mark_only_bottleneck_trainable",
    "save_bottleneck",
    "load_bottleneck",
]
