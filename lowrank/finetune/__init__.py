"""Fine-tuning strategies and one trainer for all of them (see strategies.py, trainer.py, multistage.py)."""

from lowrank.finetune.models import SmallCNN, SmallViT
from lowrank.finetune.multistage import MultiStage, Stage
from lowrank.finetune.strategies import (
    STRATEGIES,
    Adapters,
    FeatureExtraction,
    FullFineTuning,
    LoRA,
    PrefixTuning,
    PromptTuning,
    Strategy,
    make_strategy,
)
from lowrank.finetune.trainer import TrainConfig, Trainer

__all__ = [
    "Strategy",
    "FeatureExtraction",
    "FullFineTuning",
    "LoRA",
    "Adapters",
    "PromptTuning",
    "PrefixTuning",
    "STRATEGIES",
    "make_strategy",
    "TrainConfig",
    "Trainer",
    "Stage",
    "MultiStage",
    "SmallCNN",
    "SmallViT",
]
