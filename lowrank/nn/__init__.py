"""Drop-in torch.nn modules."""

from lowrank.nn.adapter import Adapter
from lowrank.nn.grad_reverse import DANNLambdaScheduler, GradientReversal, dann_lambda
from lowrank.nn.lora import LoRAAdapter, LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear
from lowrank.nn.prompt import PrefixAttention, PrefixEncoder, SoftPrompt

__all__ = [
    "Adapter",
    "LoRALayer",
    "LoRAAdapter",
    "LoRALinear",
    "LoRAEmbedding",
    "LoRAConv1D",
    "LoRAConv2d",
    "GradientReversal",
    "DANNLambdaScheduler",
    "dann_lambda",
    "SoftPrompt",
    "PrefixEncoder",
    "PrefixAttention",
]
