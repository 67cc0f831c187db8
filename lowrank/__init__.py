"""lowrank: fused LoRA, adapter and gradient-reversal kernels and drop-in modules for transfer learning."""

from lowrank import nn, ops, tuners
from lowrank._backends import backends
from lowrank.tuners import *  # noqa: F403  (every tuning method's functions, at the top level)
from lowrank.tuners import __all__ as _tuner_names

__version__ = "0.1.0"

# Earlier names, kept working: PEFT's save_adapter / load_adapter for LoRA, and the bottleneck
# adapters' plural names from before lowrank.tuners.
save_adapter, load_adapter = tuners.save_lora, tuners.load_lora
AdapterConfig = tuners.BottleneckConfig
inject_adapters, mark_only_adapters_trainable = tuners.inject_bottleneck, tuners.mark_only_bottleneck_trainable
save_adapters, load_adapters = tuners.save_bottleneck, tuners.load_bottleneck

__all__ = [
    "backends",
    "ops",
    "nn",
    "tuners",
    *_tuner_names,
    "save_adapter",
    "load_adapter",
    "AdapterConfig",
    "inject_adapters",
    "mark_only_adapters_trainable",
    "save_adapters",
    "load_adapters",
    "__version__",
]
