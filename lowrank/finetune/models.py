"""Small digit models the strategies and the CLI know by name.

Both follow the layout the strategies read by default: `blocks` (an nn.Sequential, shallow to
deep) and `head` (the final nn.Linear, applied to one pooled feature vector), so last-k-block
fine-tuning, discriminative learning rates and feature caching work without configuration.
SmallViT's blocks use GPT-2's names (ln_1, attn, ln_2, mlp), so inject_bottleneck finds them with
its Houlsby / Pfeiffer placements, and its attention has q_proj/k_proj/v_proj/out_proj, so
PrefixTuning can turn it into a lowrank.nn.PrefixAttention; its `embed` output [B, T, D] is where
PromptTuning puts its soft prompt. It pools by averaging the tokens (no CLS token), so prepended
prompt tokens need no special position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SmallCNN", "SmallViT", "MODELS"]


class SmallCNN(nn.Module):
    """LeNet-style: two conv blocks, one hidden fully connected block, a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, hidden: int = 128,
                 image_size: int = 28):
        super().__init__()
        flat = 2 * width * (image_size // 4) ** 2
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU()),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> tokens [B, T, dim], plus a learned position embedding."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, image_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.position


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (PrefixAttention's layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, num_heads)
        self.ln_2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class SmallViT(nn.Module):
    """Patch embedding, a few pre-LN transformer blocks, LayerNorm, mean pooling, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: int = 2, patch_size: int = 7, image_size: int = 28):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"SmallViT: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.embed = PatchEmbedding(in_channels, dim, patch_size, image_size)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean(dim=1))


MODELS = {"cnn": SmallCNN, "vit": SmallViT}
