"""The networks every domain-adaptation method shares, so that methods differ only in training.

A task names its network family (Task.network, a key of NETWORKS); build_network makes its parts:

    "lenet"       the LeNet of the ADDA paper (Tzeng et al. 2017), for MNIST<->USPS at 28x28:
        LeNetEncoder   conv5x5(20) - maxpool2 - ReLU - conv5x5(50) - dropout2d - maxpool2 - ReLU - fc(500)
        Classifier     ReLU - dropout - fc(10)
        Discriminator  fc(500) - ReLU - fc(500) - ReLU - fc(2)      (ADDA's FC 500-500-2)
    "dann_mnist"  the MNIST->MNIST-M network of the DANN paper (Ganin et al. 2016), no dropout, its
                  convolutions in channels_last (faster on the CPU, the same values up to rounding;
                  "lenet" keeps the default layout, which its committed MNIST<->USPS runs used):
        LeNetEncoder   conv5x5(32) - maxpool2 - ReLU - conv5x5(48) - maxpool2 - ReLU  (flattened, no fc)
        Classifier     fc(100) - ReLU - fc(100) - ReLU - fc(10)
        Discriminator  fc(100) - ReLU - fc(2)                        (the paper's fc 100 - 1 logistic)
    "dann_mnist_bn"  the same with batch norm after every convolution and hidden fc (before the
        ReLU): without it, DANN's reversed gradient can blow the features up (seed 0 of
        MNIST->MNIST-M under the earlier 32x32 protocol: 97% of them zero, the largest 1022,
        the class loss stuck at ln 10).

The encoder's flattened size follows the input (768 = 48x4x4 from MNIST->MNIST-M's 28x28 colour
images, as in the paper).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["LeNetEncoder", "Classifier", "Discriminator", "NETWORKS", "build_network", "check_feature_sizes"]

NUM_CLASSES = 10


class LeNetEncoder(nn.Module):
    """Images [N, in_channels, image_size, image_size] -> features [N, feature_dim]."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, feature_dim: Optional[int] = 500,
                 dropout: float = 0.5, widths: Sequence[int] = (20, 50), batch_norm: bool = False,
                 channels_last: bool = False):
        """feature_dim=None: no fc layer, the features are the flattened convolution maps;
        batch_norm: BatchNorm2d after each convolution; channels_last: convolution weights in
        torch.channels_last, which the CPU convolutions and pooling run faster in (the values
        are the same up to rounding)."""
        super().__init__()
        spatial = ((image_size - 4) // 2 - 4) // 2
        if spatial < 1:
            raise ValueError(f"LeNetEncoder: image_size must be at least 16, got {image_size}")
        first, second = widths
        flat = second * spatial * spatial
        self.in_channels, self.image_size = in_channels, image_size
        self.out_features = flat if feature_dim is None else feature_dim
        norm = lambda width: [nn.BatchNorm2d(width)] if batch_norm else []  # noqa: E731
        # features[0] is the first convolution: CoGAN's target stream replaces exactly that layer.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, kernel_size=5), *norm(first), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(first, second, kernel_size=5), *norm(second), nn.Dropout2d(dropout), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Identity() if feature_dim is None else nn.Linear(flat, feature_dim)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"LeNetEncoder: images must be [N, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {list(x.shape)}")
        return self.fc(self.features(x))


class Classifier(nn.Module):
    """Features [N, in_features] -> class logits [N, 10]."""

    def __init__(self, in_features: int = 500, num_classes: int = NUM_CLASSES, dropout: float = 0.5,
                 hidden: Sequence[int] = (), batch_norm: bool = False):
        super().__init__()
        self.in_features = in_features
        layers = [nn.ReLU(), nn.Dropout(dropout)]
        for width in hidden:
            layers += _hidden_layer(in_features, width, batch_norm)
            in_features = width
        self.layers = nn.Sequential(*layers, nn.Linear(in_features, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_input("Classifier", features, self.in_features)
        return self.layers(features)


class Discriminator(nn.Module):
    """Features [N, in_features] -> domain logits [N, 2] (0: source, 1: target)."""

    def __init__(self, in_features: int = 500, hidden: Sequence[int] = (500, 500), batch_norm: bool = False):
        super().__init__()
        self.in_features = in_features
        layers = []
        for width in hidden:
            layers += _hidden_layer(in_features, width, batch_norm)
            in_features = width
        self.layers = nn.Sequential(*layers, nn.Linear(in_features, 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_input("Discriminator", features, self.in_features)
        return self.layers(features)


def _hidden_layer(in_features: int, width: int, batch_norm: bool) -> list[nn.Module]:
    return [nn.Linear(in_features, width), *([nn.BatchNorm1d(width)] if batch_norm else []), nn.ReLU()]


NETWORKS = {
    "lenet": {"encoder": {"widths": (20, 50), "feature_dim": 500, "dropout": 0.5},
              "classifier": {"hidden": (), "dropout": 0.5}, "discriminator": {"hidden": (500, 500)}},
    "dann_mnist": {"encoder": {"widths": (32, 48), "feature_dim": None, "dropout": 0.0, "channels_last": True},
                   "classifier": {"hidden": (100, 100), "dropout": 0.0}, "discriminator": {"hidden": (100,)}},
    "dann_mnist_bn": {"encoder": {"widths": (32, 48), "feature_dim": None, "dropout": 0.0, "batch_norm": True,
                                  "channels_last": True},
                      "classifier": {"hidden": (100, 100), "dropout": 0.0, "batch_norm": True},
                      "discriminator": {"hidden": (100,), "batch_norm": True}},
}


def build_network(network: str, part: str, channels: int = 1, image_size: int = 28, in_features: int = 0) -> nn.Module:
    """A fresh `part` ("encoder": from channels and image_size; "classifier" or "discriminator": from
    in_features) of the NETWORKS family `network`."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}: expected one of {', '.join(NETWORKS)}")
    spec = NETWORKS[network]
    if part == "encoder":
        return LeNetEncoder(channels, image_size, **spec["encoder"])
    if part == "classifier":
        return Classifier(in_features, **spec["classifier"])
    if part == "discriminator":
        return Discriminator(in_features, **spec["discriminator"])
    raise ValueError(f"unknown network part {part!r}: expected encoder, classifier or discriminator")


def _check_input(owner: str, features: torch.Tensor, in_features: int) -> None:
    if features.dim() != 2 or features.shape[1] != in_features:
        raise ValueError(f"{owner}: expects features [N, {in_features}] (its in_features), got {list(features.shape)}; "
                         "the encoder's output size must equal the input size of the classifier and discriminator")


def check_feature_sizes(method: str, encoder: nn.Module, **heads: nn.Module) -> None:
    """Raise when the encoder's out_features differs from a head's in_features."""
    out_features = getattr(encoder, "out_features", None)
    if out_features is None:
        raise ValueError(f"{method}: the encoder must have an `out_features` attribute (its feature size)")
    for name, head in heads.items():
        in_features = getattr(head, "in_features", None)
        if in_features != out_features:
            raise ValueError(f"{method}: the encoder outputs {out_features} features but the {name} takes "
                             f"{in_features} (its in_features); build the {name} with in_features={out_features}")
