"""Gradient reversal (DANN): forward is the identity, backward multiplies the gradient by −λ.

    y = grad_reverse(x, lambda_)          y is a view of x: no copy, no kernel
    dL/dx = −λ · dL/dy                    one pass: one read and one write of the gradient

λ is a Python number or a 0-dim floating tensor (on the CPU or on x's device). A tensor λ
can change between steps without a recompile under torch.compile (GradientReversal keeps λ
in one); a float λ that changes costs one recompile, after which Dynamo treats it as dynamic.
λ itself gets no gradient.

The backward goes through one of two custom ops, each with torch/cpu/triton/cuda backends:

    lowrank::grad_reverse_backward(grad, lambda_, backend) -> Tensor     out-of-place
    lowrank::grad_reverse_backward_(grad!, lambda_, backend) -> ()       in place, on grad

In place is used only where no one else can see the incoming gradient (see
_grad_is_owned_by_backward): the memory the autograd engine would otherwise free after the
call is reused, and no new gradient is allocated. The out-of-place output has grad's strides
when grad is dense (any dim order), else it is contiguous, as torch.empty_like(grad).
"""

from __future__ import annotations

import sys
from numbers import Real
from typing import Optional, Union

import torch
from torch import Tensor

from lowrank import _backends, autotune
from lowrank.ops._dispatch import OpBackends, register_fakes

# ---------------------------------------------------------------- torch backend


def _torch_backward(grad: Tensor, lambda_: Tensor) -> Tensor:
    return torch.mul(grad, lambda_.neg(), out=torch.empty_like(grad))


def _torch_backward_(grad: Tensor, lambda_: Tensor) -> None:
    grad.mul_(lambda_.neg())


_BACKENDS = OpBackends("grad_reverse", dict(backward=_torch_backward, backward_=_torch_backward_))


def _implementation(backend: str, grad: Tensor):
    """The implementation of `backend` ("auto": the fastest for this gradient size, measured once)."""
    numel = autotune.bucket(grad.numel())

    def step_for(name: str):
        implementation = _BACKENDS.implementation(name)
        sample = torch.randn(numel, device=grad.device, dtype=grad.dtype)
        lambda_ = torch.ones((), dtype=torch.float64)
        return lambda: implementation.backward(sample, lambda_)

    key = ("grad_reverse", str(grad.device), str(grad.dtype), numel)
    return _BACKENDS.choose(backend, key, grad.device, step_for)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("lowrank::grad_reverse_backward", mutates_args=())
def _grad_reverse_backward_op(grad: Tensor, lambda_: Tensor, backend: str) -> Tensor:
    return _implementation(backend, grad).backward(grad, lambda_)


register_fakes(_grad_reverse_backward_op, lambda grad, lambda_: torch.empty_like(grad), "grad_reverse_backward_native")


def _setup_double_backward(ctx, inputs, output):
    _, lambda_, backend = inputs
    ctx.save_for_backward(lambda_)
    ctx.backend = backend


def _double_backward(ctx, grad_grad):
    # The backward is linear in grad: its own backward is the same −λ scaling.
    (lambda_,) = ctx.saved_tensors
    return _grad_reverse_backward_op(grad_grad, lambda_, ctx.backend), None, None


_grad_reverse_backward_op.register_autograd(_double_backward, setup_context=_setup_double_backward)


@torch.library.custom_op("lowrank::grad_reverse_backward_", mutates_args=("grad",))
def _grad_reverse_backward_inplace_op(grad: Tensor, lambda_: Tensor, backend: str) -> None:
    _implementation(backend, grad).backward_(grad, lambda_)


register_fakes(_grad_reverse_backward_inplace_op, lambda grad, lambda_: None, "grad_reverse_backward_native_")


# ---------------------------------------------------------------- may the gradient be overwritten?
#
# The autograd engine hands a Function's backward the gradient it accumulated for the output.
# Usually that tensor is garbage the moment backward returns, but not always: the same tensor
# may also be queued for another node (add's backward gives both inputs the same tensor), be a
# leaf's .grad-to-be in AccumulateGrad's buffer, be held by the caller (y.backward(g) or
# autograd.grad(..., grad_outputs=g): the graph root keeps it), be stored by a tensor hook, or
# share memory with other tensors (a view of cat's gradient, an expanded scalar from sum()).
# Overwriting it then corrupts someone else's gradient.
#
# There is no flag for "owned", so this decides the way AccumulateGrad decides whether it may
# steal a gradient instead of copying it (torch/csrc/autograd/functions/accumulate_grad.h:
# use_count() <= expected refs) and torch.utils.swap_tensors checks exclusivity
# (Tensor._use_count): count every kind of reference. A gradient is owned when
#   - its TensorImpl has no strong references beyond the engine's and this call's,
#   - its storage is referenced by this TensorImpl alone (no view, no .detach() alias),
#   - its Python object has no references beyond this call's (no hook kept it),
#   - it is a plain dense tensor (not a view, no stride 0, no overlap), does not require grad,
#     and grad mode is off (create_graph=True may make it part of a graph).
# The exact counts "the engine's and this call's" depend on the PyTorch and Python versions,
# so they are measured once per device type by running backward through a probe whose
# gradient is known to be owned, and through probes whose gradient is known to be shared;
# if any shared probe shows the owned counts, in-place reuse stays off on that device.
# While tracing (torch.compile, torch.func) the gradient is a fake or wrapped tensor: counts
# mean nothing there, and the out-of-place op is used; the compiler plans the memory.

_owned_counts: dict[str, Optional[tuple[int, int, int]]] = {}


def _reference_counts(grad: Tensor) -> tuple[int, int, int]:
    """(Python refs, TensorImpl refs, storage refs) of the gradient as backward sees it."""
    return sys.getrefcount(grad), grad._use_count(), torch._C._storage_Use_Count(grad.untyped_storage()._cdata)


def is_dense(t: Tensor) -> bool:
    """True when t's elements fill t.numel() consecutive memory slots, in any dim order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _grad_is_owned_by_backward(grad: Tensor, counts: tuple[int, int, int]) -> bool:
    return (
        type(grad) is Tensor  # fake, functional and other subclass tensors: tracing, or not ours to judge
        and not torch.is_grad_enabled()
        and not grad.requires_grad
        and grad.layout == torch.strided
        and grad._base is None
        and not torch._C._functorch.is_functorch_wrapped_tensor(grad)
        and is_dense(grad)
        and counts == _owned_counts.get(grad.device.type)
    )


class _CountProbe(torch.autograd.Function):
    """Identity whose backward records the reference counts of its gradient, called exactly as
    _GradReverse.backward calls _reference_counts (same frames, same arguments)."""

    @staticmethod
    def forward(x, record):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.record = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        counts = _reference_counts(grad)
        ctx.record.append(counts)
        return grad, None


def _calibrate(device: torch.device) -> Optional[tuple[int, int, int]]:
    """The counts of an owned gradient on this device type, or None if they do not tell an
    owned gradient from a shared one."""

    def counts_in(run) -> tuple[int, int, int]:
        record: list = []
        x = torch.ones(4, device=device, requires_grad=True)
        run(lambda t: _CountProbe.apply(t, record), x)
        (counts,) = record
        return counts

    def kept_by_hook(probe, x):
        kept = []
        y = probe(x)
        y.register_hook(kept.append)
        (y * 2).sum().backward()

    with torch.enable_grad():
        owned = counts_in(lambda probe, x: (probe(x) * 2).sum().backward())
        shared = [
            counts_in(lambda probe, x: probe(x).backward(torch.ones_like(x))),  # the graph root holds it
            counts_in(lambda probe, x: ((probe(x) + x) * 2).sum().backward()),  # queued for x's AccumulateGrad
            counts_in(kept_by_hook),  # a Python reference outlives the hook
        ]
    return None if owned in shared else owned


def _ensure_calibrated(device: torch.device) -> None:
    if device.type not in _owned_counts:
        _owned_counts[device.type] = _calibrate(device)


# ---------------------------------------------------------------- autograd


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(x, lambda_, backend):
        # An alias, not a copy. (A custom op may not return an alias of its input, so the
        # forward is a Function around a view; the backward is the custom op.)
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, lambda_, backend = inputs
        ctx.save_for_backward(lambda_)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad):
        (lambda_,) = ctx.saved_tensors
        if torch.compiler.is_compiling():  # traced: the compiler plans the memory
            return _grad_reverse_backward_op(grad, lambda_, ctx.backend), None, None
        counts = _reference_counts(grad)  # first use of grad, as in _CountProbe.backward
        if _grad_is_owned_by_backward(grad, counts):
            _grad_reverse_backward_inplace_op(grad, lambda_, ctx.backend)
            return grad, None, None
        return _grad_reverse_backward_op(grad, lambda_, ctx.backend), None, None


# ---------------------------------------------------------------- public API


def _lambda_tensor(lambda_, x: Tensor) -> Tensor:
    """λ as the 0-dim float64 tensor the ops take."""
    if isinstance(lambda_, Tensor):
        if lambda_.dim() != 0 or not lambda_.is_floating_point():
            raise ValueError(
                f"grad_reverse: lambda_ must be a Python number or a 0-dim floating-point tensor, "
                f"got a tensor of shape {tuple(lambda_.shape)} and dtype {lambda_.dtype}"
            )
        if lambda_.device.type != "cpu" and lambda_.device != x.device:
            raise ValueError(
                f"grad_reverse: lambda_ is on {lambda_.device} but x is on {x.device}; "
                "put it on the CPU or on x's device"
            )
        return lambda_.detach().to(torch.float64)
    if isinstance(lambda_, bool) or not isinstance(lambda_, Real):
        raise TypeError(
            f"grad_reverse: lambda_ must be a Python number or a 0-dim tensor, got {type(lambda_).__name__}"
        )
    # Built by arithmetic, not torch.tensor(lambda_): Dynamo specialises on a float passed to a
    # tensor constructor (a recompile per value), but traces a multiplication by it symbolically.
    return torch.ones((), dtype=torch.float64) * lambda_


def grad_reverse(x: Tensor, lambda_: Union[float, Tensor] = 1.0, *, backend: Optional[str] = None) -> Tensor:
    """Identity forward (a view of x, no copy); the gradient flowing back is multiplied by −λ.

    lambda_: a Python number or a 0-dim floating tensor (CPU or x's device; not differentiated).
    backend: "torch", "cpu", "triton", "cuda", "auto" (fastest for the size, measured once:
    lowrank.autotune), or None (LOWRANK_BACKEND, else "auto").
    The output is a view created in a custom Function: modifying it in place raises (PyTorch's
    rule for such views); use an out-of-place op after it.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"grad_reverse: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"grad_reverse: x must be a floating-point tensor, got dtype {x.dtype}")
    lambda_ = _lambda_tensor(lambda_, x)
    backend = _backends.resolve(backend, x.device, "grad_reverse")
    if not torch.compiler.is_compiling():
        _ensure_calibrated(x.device)
    return _GradReverse.apply(x, lambda_, backend)
