"""Drop-in torch.nn modules."""

from lowrank.nn.adapter import Adapter
from lowrank.nn.lora import LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear

__all__ = ["Adapter", "LoRALayer", "LoRALinear", "LoRAEmbedding", "LoRAConv1D", "LoRAConv2d"]
