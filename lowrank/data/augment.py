"""Per-image augmentation for digit tensors (DigitDataset's `transform`), in plain torch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["RandomAffine"]


class RandomAffine:
    """A random rotation, isotropic scale and translation of one image [C, H, W].

    degrees: the rotation is uniform in ±degrees; scale: (low, high) zoom factors; translate: the
    shift is uniform in ±translate·size per axis. Pixels outside the source take `fill` (the
    normalised background: -1 for DigitDataset's default mean 0.5, std 0.5; a [C, 1, 1] tensor
    gives each channel its own). Draws from torch's
    global RNG, so the Trainer's per-epoch seeding makes it reproducible.
    """

    def __init__(self, degrees: float = 10.0, scale: tuple[float, float] = (0.9, 1.1), translate: float = 0.1,
                 fill: float | torch.Tensor = -1.0):
        if degrees < 0 or translate < 0 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"RandomAffine: need degrees >= 0, translate >= 0 and 0 < scale[0] <= scale[1], got "
                             f"degrees={degrees}, scale={scale}, translate={translate}")
        self.degrees, self.scale, self.translate, self.fill = degrees, scale, translate, fill

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3:
            raise ValueError(f"RandomAffine: expected one image [C, H, W], got shape {tuple(image.shape)}")
        u = torch.rand(4)
        angle = math.radians((2 * u[0].item() - 1) * self.degrees)
        zoom = self.scale[0] + (self.scale[1] - self.scale[0]) * u[1].item()
        shift_x, shift_y = ((2 * u[2:] - 1) * 2 * self.translate).tolist()  # grid coordinates span [-1, 1]
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        height, width = image.shape[-2:]
        # The sampling grid of F.affine_grid(align_corners=False), built directly: affine_grid is
        # ~1 ms per call on CPU, more than the rest of a small model's training step per image.
        x = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, dtype=image.dtype)
        y = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, dtype=image.dtype).unsqueeze(1)
        grid = torch.stack((cos * x - sin * y + shift_x, sin * x + cos * y + shift_y), dim=-1)
        # Sample the image shifted so that `fill` (not 0) is what lies outside it.
        out = F.grid_sample((image - self.fill).unsqueeze(0), grid.unsqueeze(0), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
        return out.squeeze(0) + self.fill
