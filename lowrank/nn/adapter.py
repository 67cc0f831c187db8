"""Bottleneck adapter (Houlsby et al. 2019; AdapterHub's `adapters`) as a drop-in torch.nn module.

    out = h + scaling · (act(h·W_downᵀ + b_down)·W_upᵀ + b_up)      residual=True
    out =     scaling · (act(h·W_downᵀ + b_down)·W_upᵀ + b_up)      residual=False (parallel placement:
                                                                    the caller adds it to another output)

computed by the fused op `lowrank.ops.adapter`.

state_dict keys: `down.weight` [bottleneck, dim], `down.bias` [bottleneck], `up.weight` [dim, bottleneck],
`up.bias` [dim] (nn.Linear's names and layouts: W_down maps dim -> bottleneck, W_up back).

Initialisation (`init`):
    "identity"  W_down kaiming-uniform (nn.Linear's default), W_up, b_down and b_up zero: the residual
                adapter starts as the exact identity and the parallel one adds exactly zero, while
                W_up still gets a gradient on the first step (as LoRA's zero B does).
    "houlsby"   every weight drawn from N(0, init_std²) truncated at ±2·init_std, biases zero
                (Houlsby's near-identity init; AdapterHub's init_weights="houlsby").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank import _backends
from lowrank.ops.adapter import ACTIVATIONS, adapter as adapter_op

__all__ = ["Adapter", "ACTIVATIONS", "INITS"]

INITS = ("identity", "houlsby")


class _Projection(nn.Module):
    """A weight [out, in] and bias [out], in nn.Linear's layout and key names.

    Deliberately not an nn.Linear: LoRA injection targeting "all-linear" must not replace the
    adapter's projections (the fused adapter op reads these Parameters directly).
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Adapter(nn.Module):
    """Bottleneck adapter: dim -> bottleneck -> dim, with an activation in between (see module docstring).

    `name` is only used in error messages; inject_bottleneck sets it to the adapter's full module name.
    """

    def __init__(
        self, dim: int, bottleneck: int, activation: str = "relu", scaling: float = 1.0, init: str = "identity",
        residual: bool = True, init_std: float = 1e-2, device=None, dtype=None, backend=None, name: str | None = None,
    ):  # fmt: skip
        super().__init__()
        self.name = name
        owner = self._label() if name else f"Adapter(dim={dim!r}, bottleneck={bottleneck!r})"
        for what, value in (("dim", dim), ("bottleneck", bottleneck)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{owner}: {what} must be a positive integer, got {value!r}")
        if bottleneck > dim:
            raise ValueError(f"{owner}: bottleneck ({bottleneck}) must not be larger than dim ({dim})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{owner}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"{owner}: scaling must be a finite number, got {scaling!r}")
        if init not in INITS:
            raise ValueError(f"{owner}: unknown init {init!r}; expected one of {INITS}")
        if not isinstance(init_std, (int, float)) or not init_std > 0:
            raise ValueError(f"{owner}: init_std must be a positive number, got {init_std!r}")
        _backends.check_name(owner, backend)
        self.dim, self.bottleneck = dim, bottleneck
        self.activation, self.scaling, self.residual = activation, float(scaling), bool(residual)
        self.init, self.init_std = init, float(init_std)
        self.backend = backend
        self.down = _Projection(dim, bottleneck, device=device, dtype=dtype)
        self.up = _Projection(bottleneck, dim, device=device, dtype=dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if self.init == "identity":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            for weight in (self.down.weight, self.up.weight):
                nn.init.trunc_normal_(weight, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)

    def _label(self) -> str:
        return f"Adapter {self.name!r}" if self.name else f"Adapter(dim={self.dim}, bottleneck={self.bottleneck})"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 0 or h.shape[-1] != self.dim:
            raise ValueError(f"{self._label()}: expected input of shape [..., {self.dim}], got {list(h.shape)}")
        return adapter_op(
            h, self.down.weight, self.down.bias, self.up.weight, self.up.bias, activation=self.activation,
            scaling=self.scaling, residual=self.residual, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
            f"scaling={self.scaling}, residual={self.residual}"
        )
