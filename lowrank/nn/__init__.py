"""Drop-in torch.nn modules."""

from lowrank.nn.grad_reverse import DANNLambdaScheduler, GradientReversal, dann_lambda
from lowrank.nn.lora import LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear

__all__ = ["LoRALayer", "LoRALinear", "LoRAEmbedding", "LoRAConv1D", "LoRAConv2d", "GradientReversal", "DANNLambdaScheduler", "dann_lambda"]
