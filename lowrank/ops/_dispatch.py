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
    """One op's implementations by backend name, each found through the op's stem:

        torch    the pure-PyTorch methods given here
        native   (cpu and cuda) the C++ op lowrank::<stem>_<method>_native for each of them; an in-place
                 method, whose name ends in "_", calls lowrank::<stem>_<method>_native_ (PyTorch's spelling)
        triton   the functions of the same names in lowrank.kernels.<stem>

    inference_from_forward: torch and native also get `inference`, the training forward without dropout
    (inference_through); the Triton module defines its own."""

    def __init__(self, stem: str, torch: dict[str, Callable], inference_from_forward: bool = False):
        native = {method: native_op(native_name(stem, method)) for method in torch}
        if inference_from_forward:
            torch = {**torch, "inference": inference_through(torch["forward"])}
            native["inference"] = inference_through(native["forward"])
        self.torch = SimpleNamespace(**torch)
        self.native = SimpleNamespace(**native)
        self.triton_module = f"lowrank.kernels.{stem}"

    def implementation(self, backend: str):
        """The implementation of a concrete backend (not "auto")."""
        if backend == "torch":
            return self.torch
        if backend in ("cpu", "cuda"):
            return self.native
        return importlib.import_module(self.triton_module)  # imports triton: only when asked for

    def choose(self, backend: str, key: Hashable, device: torch.device, step_for: Callable[[str], Callable[[], None]]):
        """The implementation of `backend`; for "auto" the one lowrank.autotune picks for `key` on
        `device`, measured once per process by timing step_for(backend name)() (a forward+backward)."""
        if backend == "auto":
            backend = autotune.pick(key, device, step_for)
        return self.implementation(backend)


def native_name(stem: str, method: str) -> str:
    """The C++ op behind an op's method: <stem>_<method>_native, or <stem>_<method>_native_ for in-place ones."""
    in_place = method.endswith("_")
    return f"{stem}_{method.rstrip('_')}_native" + ("_" if in_place else "")


def native_op(name: str) -> Callable:
    """A caller of torch.ops.lowrank.<name>, looked up at call time (the extension may be absent)."""

    def call(*args):
        return getattr(torch.ops.lowrank, name)(*args)

    call.__name__ = name
    return call


def random_maker(like: Tensor) -> Callable[..., Tensor]:
    """make(*shape): standard normal tensors on like's device and in its dtype (auto's timing inputs)."""

    def make(*shape):
        return torch.randn(*shape, device=like.device, dtype=like.dtype)

    return make


def inference_through(forward: Callable) -> Callable:
    """inference(*args) of a backend without a kernel of its own for it: the output of
    forward(*args, dropout_p=0.0, seed=None), the training forward (whose last two arguments
    those are) without dropout."""

    def inference(*args):
        return forward(*args, 0.0, None)[0]

    return inference


def empty_if_skipped(grads: tuple[Optional[Tensor], ...], needed: tuple[bool, ...], like: Tensor) -> tuple[Tensor, ...]:
    """Custom ops cannot return None: a gradient that is not needed travels as an empty tensor."""
    return tuple(grad if need else like.new_empty(0) for grad, need in zip(grads, needed))


def none_if_skipped(grads: tuple[Tensor, ...], needed: tuple[bool, ...]) -> tuple[Optional[Tensor], ...]:
    """The autograd side of empty_if_skipped: a gradient that is not needed is None."""
    return tuple(grad if need else None for grad, need in zip(grads, needed))


def fake_gradients(like: Tensor, shapes: tuple, needed: tuple[bool, ...]) -> tuple[Tensor, ...]:
    """A backward op's fake outputs: a gradient of each shape, empty where it is not needed."""
    return tuple(like.new_empty(shape if need else 0) for shape, need in zip(shapes, needed))


def register_fakes(op, fake: Callable, native_name: Optional[str] = None) -> None:
    """Register `fake` (shapes only, for opcheck and torch.compile) for the custom op `op`, whose last
    argument is `backend`, and for the C++ op lowrank::<native_name>, which takes the same arguments
    without it (nothing to register there when the extension is absent or lacks it)."""
    op.register_fake(lambda *args: fake(*args[:-1]))
    if native_name is not None and _backends.has_native_op(native_name):
        torch.library.register_fake(f"lowrank::{native_name}", fake)
