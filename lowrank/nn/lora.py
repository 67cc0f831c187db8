"""LoRA drop-in layers: each subclasses (or mirrors) the layer it replaces and keeps its
constructor and state_dict keys, adding `lora_A` and `lora_B` (as in loralib).

    out = base(x) + scaling · B(A(dropout(x))),        scaling = alpha / r

The base weight is frozen on construction; lora_A / lora_B are the trainable parameters.
Initialisation follows HF PEFT: for Linear, Conv1D and Conv2d A is kaiming-uniform and B is
zero; for Embedding A is zero and B is standard normal. Either way the layer starts out
computing exactly what the base layer computes.

`merge()` folds scaling · B·A into the base weight (computed in float32 or wider, rounded
once to the weight dtype) so inference runs the plain base layer; `unmerge()` subtracts the
same, recomputed delta. The delta is a deterministic function of A and B, so repeated
merge/unmerge cycles do not accumulate error: the weight settles after the first cycle,
within one rounding of the original. (Remembering the delta actually applied in the weight
dtype instead makes the error random-walk, measurably so.)
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.ops import lora_linear

__all__ = ["LoRALayer", "LoRALinear", "LoRAEmbedding", "LoRAConv1D", "LoRAConv2d", "is_hf_conv1d"]


def check_lora_hyperparameters(owner: str, r, alpha, dropout) -> None:
    """Raise ValueError naming `owner` when r, alpha or dropout is out of range."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{owner}: r (LoRA rank) must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{owner}: alpha must be a positive finite number (scaling = alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be a probability in [0, 1), got {dropout!r}")


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D (checked without importing transformers:
    an instance can only exist if transformers.pytorch_utils was already imported)."""
    conv1d_class = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d_class is not None and isinstance(module, conv1d_class)


def _check_base(owner: str, base: nn.Module, expected: str, is_expected: bool) -> None:
    if isinstance(base, LoRALayer):
        raise TypeError(f"{owner}: the module already has LoRA ({type(base).__name__}); wrap a plain {expected}")
    if not is_expected:
        raise TypeError(f"{owner}: expected a {expected}, got {type(base).__name__}")


class LoRALayer:
    """State and merge logic shared by every LoRA layer (a mixin in front of the base class).

    Subclasses own `weight`, `lora_A`, `lora_B` and implement `delta_weight()`. Their
    from_<base> constructors build the layer on the meta device (nothing allocated), hand it
    the base layer's Parameters, then create lora_A / lora_B beside them.
    """

    r: int
    alpha: float
    dropout: float
    merged: bool

    def _add_lora(self, r, alpha, dropout, a_shape, b_shape) -> None:
        check_lora_hyperparameters(type(self).__name__, r, alpha, dropout)
        self.r, self.alpha, self.dropout = r, alpha, float(dropout)
        self.merged = False
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **factory))
        self.weight.requires_grad_(False)
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform, B zero (Embedding overrides)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.lora_A.dtype, torch.float32)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B·A in the base weight's layout, in float32 (float64 for float64 weights)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA update into the base weight (no-op if already merged)."""
        if not self.merged:
            self.weight.copy_(torch.add(self.weight, self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the LoRA update back out of the base weight (no-op if not merged)."""
        if self.merged:
            self.weight.copy_(torch.sub(self.weight, self.delta_weight()))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}, merged={self.merged}"


class LoRALinear(LoRALayer, nn.Linear):
    """nn.Linear with a LoRA update: lora_A [r, in_features], lora_B [out_features, r]."""

    def __init__(
        self, in_features, out_features, r=8, alpha=16, dropout=0.0, bias=True, device=None, dtype=None, backend=None
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = backend
        self._add_lora(r, alpha, dropout, (r, in_features), (out_features, r))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, alpha=16, dropout=0.0, backend=None) -> LoRALinear:
        """Wrap `linear`, sharing its weight and bias Parameters (no copy)."""
        _check_base(f"{cls.__name__}.from_linear", linear, "torch.nn.Linear", isinstance(linear, nn.Linear))
        module = cls(
            linear.in_features, linear.out_features, r, alpha, dropout,
            bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype, backend=backend,
        )  # fmt: skip
        module.weight, module.bias = linear.weight, linear.bias
        module._add_lora(r, alpha, dropout, (r, linear.in_features), (linear.out_features, r))
        return module

    def delta_weight(self) -> torch.Tensor:
        dtype = self._compute_dtype()
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dropout_p = self.dropout if self.training else 0.0
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, dropout_p, backend=self.backend
        )


class LoRAConv1D(LoRALayer, nn.Module):
    """transformers' GPT-2 `Conv1D(nf, nx)` with LoRA: same `weight` [nx, nf] (= [in, out]) and
    `bias` [nf] keys, plus lora_A [r, nx] and lora_B [nf, r] (PEFT's fan_in_fan_out layout).

    It mirrors Conv1D rather than subclassing it, so lowrank does not depend on transformers.
    """

    def __init__(self, nf, nx, r=8, alpha=16, dropout=0.0, device=None, dtype=None, backend=None):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)  # as transformers' Conv1D
        self.backend = backend
        self._add_lora(r, alpha, dropout, (r, nx), (nf, r))

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, r=8, alpha=16, dropout=0.0, backend=None) -> LoRAConv1D:
        """Wrap a transformers Conv1D, sharing its weight and bias Parameters (no copy)."""
        _check_base(f"{cls.__name__}.from_conv1d", conv1d, "transformers Conv1D", is_hf_conv1d(conv1d))
        module = cls(conv1d.nf, conv1d.nx, r, alpha, dropout, device="meta", dtype=conv1d.weight.dtype, backend=backend)
        module.weight, module.bias = conv1d.weight, conv1d.bias
        module._add_lora(r, alpha, dropout, (r, conv1d.nx), (conv1d.nf, r))
        return module

    def delta_weight(self) -> torch.Tensor:
        dtype = self._compute_dtype()
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype)).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight.t() is a transposed view of the [in, out] storage, not a copy.
        if self.merged:
            return F.linear(x, self.weight.t(), self.bias)
        dropout_p = self.dropout if self.training else 0.0
        return lora_linear(
            x, self.weight.t(), self.bias, self.lora_A, self.lora_B, self.scaling, dropout_p, backend=self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"nf={self.nf}, nx={self.nx}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}, merged={self.merged}"
        )


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """nn.Embedding with a LoRA update (PEFT semantics):
    lora_A [r, num_embeddings], lora_B [embedding_dim, r], out = emb(x) + scaling · A.T[x] · B.T.

    There is no dropout: a lookup has no input features to drop (PEFT ignores lora_dropout here too).
    """

    def __init__(
        self, num_embeddings, embedding_dim, r=8, alpha=16, padding_idx=None, max_norm=None, norm_type=2.0,
        scale_grad_by_freq=False, sparse=False, device=None, dtype=None,
    ):  # fmt: skip
        super().__init__(
            num_embeddings, embedding_dim, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, device=device, dtype=dtype,
        )  # fmt: skip
        self._add_lora(r, alpha, 0.0, (r, num_embeddings), (embedding_dim, r))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r=8, alpha=16) -> LoRAEmbedding:
        """Wrap `embedding`, sharing its weight Parameter (no copy; weight tying survives)."""
        _check_base(
            f"{cls.__name__}.from_embedding", embedding, "torch.nn.Embedding", isinstance(embedding, nn.Embedding)
        )
        module = cls(
            embedding.num_embeddings, embedding.embedding_dim, r, alpha, padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm, norm_type=embedding.norm_type, scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse, device="meta", dtype=embedding.weight.dtype,
        )  # fmt: skip
        module.weight = embedding.weight
        module._add_lora(r, alpha, 0.0, (r, embedding.num_embeddings), (embedding.embedding_dim, r))
        return module

    def reset_lora_parameters(self) -> None:
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        dtype = self._compute_dtype()
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype)).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.merged:
            return out
        # padding_idx / scale_grad_by_freq shape the gradient of A the way they shape the base's.
        after_A = F.embedding(x, self.lora_A.t(), self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        return out + self.scaling * (after_A @ self.lora_B.t())


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """nn.Conv2d with a LoRA update in PEFT's layout: lora_A [r, in_channels, kh, kw] applied with the
    base conv's stride, padding, dilation and padding_mode; lora_B [out_channels, r, 1, 1] a 1x1 conv.

    Only groups=1: a grouped base weight cannot absorb the dense B·A update, so merging would be
    impossible (PEFT refuses to merge those too).
    """

    def __init__(
        self, in_channels, out_channels, kernel_size, r=8, alpha=16, dropout=0.0, stride=1, padding=0, dilation=1,
        groups=1, bias=True, padding_mode="zeros", device=None, dtype=None,
    ):  # fmt: skip
        if groups != 1:
            raise ValueError(f"{type(self).__name__}: only groups=1 convolutions are supported, got groups={groups}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        self._add_lora(r, alpha, dropout, (r, in_channels, *self.kernel_size), (out_channels, r, 1, 1))

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, r=8, alpha=16, dropout=0.0) -> LoRAConv2d:
        """Wrap `conv`, sharing its weight and bias Parameters (no copy)."""
        _check_base(f"{cls.__name__}.from_conv2d", conv, "torch.nn.Conv2d", isinstance(conv, nn.Conv2d))
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, r, alpha, dropout, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device="meta", dtype=conv.weight.dtype,
        )  # fmt: skip
        module.weight, module.bias = conv.weight, conv.bias
        module._add_lora(r, alpha, dropout, (r, conv.in_channels, *conv.kernel_size), (conv.out_channels, r, 1, 1))
        return module

    def delta_weight(self) -> torch.Tensor:
        dtype = self._compute_dtype()
        delta = self.lora_B.to(dtype).flatten(1) @ self.lora_A.to(dtype).flatten(1)
        return self.scaling * delta.view(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.merged:
            return out
        x_lora = F.dropout(x, self.dropout, self.training)
        # _conv_forward applies this layer's stride/padding/dilation/padding_mode to the A kernel.
        after_A = self._conv_forward(x_lora, self.lora_A, None)
        return out + self.scaling * F.conv2d(after_A, self.lora_B)
