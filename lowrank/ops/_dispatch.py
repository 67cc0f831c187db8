"""How each op reaches its backends (see lowrank._backends for what they are), written once.

An op lists its implementations in one OpBackends: the pure-PyTorch functions (torch), the C++
extension's ops (cpu and cuda: one schema each, the dispatcher picks the device's kernel) and
its Triton module (triton, imported on first use). Every implementation offers the same
methods with the same arguments; "auto" is resolved per problem by lowrank.autotune.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Callable, Hashable, Optional

import torch
from torch import Tensor

from lowrank import _backends, autotune


class OpBackends:
    """One op's implementations by backend name.

    torch, native: {method: function} (native ones call the C++ ops, see native_op);
    triton_module: the module of lowrank.kernels that implements the same methods."""

    def __init__(self, torch: dict[str, Callable], native: dict[str, Callable], triton_module: str):
        self.torch = SimpleNamespace(**torch)
        self.native = SimpleNamespace(**native)
        self.triton_module = triton_module

    def implementation(self, backend: str):
        """The implementation of a concrete backend (not "auto")."""
        if backend == "torch":
            return self.torch
        if backend in ("cpu", "cuda"):
            return self.native
        return importlib.import_module(self.triton_module)  # imports triton: only when asked for

    def choose(self, backend: str, key: Hashable, device: torch.device, measure: Callable[[str], float]):
        """The implementation of `backend`; for "auto" the fastest for `key` on `device`, measured
        once per process by measure(backend name) (lowrank.autotune)."""
        if backend == "auto":
            backend = autotune.pick(key, device, measure)
        return self.implementation(backend)


def native_op(name: str) -> Callable:
    """A caller of torch.ops.lowrank.<name>, looked up at call time (the extension may be absent)."""

    def call(*args):
        return getattr(torch.ops.lowrank, name)(*args)

    call.__name__ = name
    return call


def empty_if_skipped(grads: tuple[Optional[Tensor], ...], needed: tuple[bool, ...], like: Tensor) -> tuple[Tensor, ...]:
    """Custom ops cannot return None: a gradient that is not needed travels as an empty tensor."""
    return tuple(grad if need else like.new_empty(0) for grad, need in zip(grads, needed))


def none_if_skipped(grads: tuple[Tensor, ...], needed: tuple[bool, ...]) -> tuple[Optional[Tensor], ...]:
    """The autograd side of empty_if_skipped: a gradient that is not needed is None."""
    return tuple(grad if need else None for grad, need in zip(grads, needed))


def register_native_fakes(fakes: dict[str, Callable]) -> None:
    """Fake (meta) kernels for the C++ ops, which share the public op's shapes, so that opcheck
    and torch.compile can trace them; nothing to do without the extension."""
    if _backends.EXTENSION is not None:
        for name, fake in fakes.items():
            torch.library.register_fake(f"lowrank::{name}", fake)
