"""Fused LoRA linear: y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ.

x [..., K], W [N, K], b [N] or None, A [r, K], B [N, r].

The op is `torch.ops.lowrank.lora_linear` (custom op with fake and autograd
registrations, so opcheck and torch.compile(fullgraph=True) work); when no gradient is
needed and there is no dropout, `torch.ops.lowrank.lora_linear_inference` runs instead.
They dispatch to one of four backends, each implementing the same three functions:

    forward(x, W, b, A, B, s, p, seed)  -> (y, xa)            xa = dropout(x)·Aᵀ  [M, r]
    backward(dy, x, xa, W, A, B, s, p, seed, needs_dx, needs_dweight, needs_dbias)
                                        -> (dx, dW, db, dA, dB)
    inference(x, W, b, A, B, s)         -> y

    dyB = dy·B                  dx = dy·W + D⊙(s·dyB·A)       (D: dropout keep mask / (1-p))
    dA  = s·dyBᵀ·(D⊙x)          dB = s·dyᵀ·xa     dW = dyᵀ·x    db = Σ_rows dy

Only x and xa are saved for backward; the dropout mask is rebuilt from `seed`
(see hash_dropout). Gradients that are not needed may come back as None.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lowrank import _backends, autotune
from lowrank.ops import hash_dropout
from lowrank.ops._common import autocast_inputs
from lowrank.ops._dispatch import (
    OpBackends,
    empty_if_skipped,
    fake_gradients,
    none_if_skipped,
    random_maker,
    register_fakes,
)


def lora_linear_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> Tensor:
    """Plain autograd formula: the oracle for tests (any leading dims)."""
    x_lora = x
    if dropout_p > 0.0:
        x2d = x.reshape(-1, x.shape[-1])
        x_lora = hash_dropout.apply(x2d, seed, dropout_p).reshape(x.shape)
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scaling * ((x_lora @ lora_A.t()) @ lora_B.t())


# ---------------------------------------------------------------- torch backend


def _torch_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    x_lora = hash_dropout.apply(x, seed, dropout_p) if dropout_p > 0.0 else x
    xa = x_lora @ lora_A.t()
    y = torch.nn.functional.linear(x, weight, bias)
    # s scales the small factor, never a GEMM's alpha: BLAS skips the product at alpha=0, which
    # would hide a NaN in B that the formula s·(xa·Bᵀ) propagates.
    y = y.addmm_(xa * scaling, lora_B.t())
    return y, xa


def _torch_backward(
    grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, needs_dx, needs_dweight, needs_dbias
):
    dyB_s = (grad_y @ lora_B).mul_(scaling)  # s on the small factor (see _torch_forward)
    dx = dW = db = None
    if dropout_p > 0.0:
        keep = hash_dropout.keep_mask(seed, x.shape[0], x.shape[1], dropout_p)
        dA = dyB_s.t() @ hash_dropout.apply_mask(x, keep, dropout_p)
        if needs_dx:
            dx = (grad_y @ weight).add_(hash_dropout.apply_mask(dyB_s @ lora_A, keep, dropout_p))
    else:
        dA = dyB_s.t() @ x
        if needs_dx:
            dx = (grad_y @ weight).addmm_(dyB_s, lora_A)
    dB = (grad_y.t() @ xa).mul_(scaling)
    if needs_dweight:
        dW = grad_y.t() @ x
    if needs_dbias:
        db = grad_y.sum(0)
    return dx, dW, db, dA, dB


_BACKENDS = OpBackends("lora_linear", dict(forward=_torch_forward, backward=_torch_backward),
                       inference_from_forward=True)


def _implementation_for(backend: str, x: Tensor, weight: Tensor, lora_A: Tensor, dropout_p: float):
    """The implementation of `backend` ("auto": the fastest for this problem, measured once)."""
    (M, K), N, r = x.shape, weight.shape[0], lora_A.shape[0]
    rows = autotune.bucket(M)

    make = random_maker(x)

    def step_for(name: str):
        implementation = _BACKENDS.implementation(name)
        x_, weight_, bias_, A_, B_, grad_y = make(rows, K), make(N, K), make(N), make(r, K), make(N, r), make(rows, N)
        seed = torch.zeros((), dtype=torch.int64, device=x.device) if dropout_p > 0.0 else None

        def step():
            _, xa = implementation.forward(x_, weight_, bias_, A_, B_, 0.5, dropout_p, seed)
            implementation.backward(grad_y, x_, xa, weight_, A_, B_, 0.5, dropout_p, seed, True, False, False)

        return step

    key = ("lora_linear", str(x.device), str(x.dtype), rows, K, N, r, dropout_p > 0.0)
    return _BACKENDS.choose(backend, key, x.device, step_for)


# ---------------------------------------------------------------- custom op


# Every custom op takes `backend` last, so one fake serves it and its C++ op (register_fakes).


@torch.library.custom_op("lowrank::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float, seed: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    return _implementation_for(backend, x, weight, lora_A, dropout_p).forward(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed
    )


def _forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


register_fakes(_lora_linear_op, _forward_fake, "lora_linear_forward_native")


@torch.library.custom_op("lowrank::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad_y: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float, seed: Optional[Tensor], needs_dx: bool, needs_dweight: bool, needs_dbias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _implementation_for(backend, x, weight, lora_A, dropout_p).backward(
        grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, needs_dx, needs_dweight, needs_dbias
    )
    return empty_if_skipped(grads, (needs_dx, needs_dweight, needs_dbias, True, True), grad_y)


def _backward_fake(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, *needed):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    return fake_gradients(grad_y, shapes, (*needed, True, True))  # dA and dB are always computed


register_fakes(_lora_linear_backward_op, _backward_fake, "lora_linear_backward_native")


@torch.library.custom_op("lowrank::lora_linear_inference", mutates_args=())
def _lora_linear_inference_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float, backend: str
) -> Tensor:
    """Forward only (no gradient, no dropout): nothing is saved and xa need not be returned,
    which lets the Triton backend run a single fused launch for few rows."""
    return _implementation_for(backend, x, weight, lora_A, 0.0).inference(x, weight, bias, lora_A, lora_B, scaling)


register_fakes(_lora_linear_inference_op, lambda x, weight, *_: x.new_empty(x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, xa, weight, lora_A, lora_B, seed)
    ctx.hyper = (scaling, dropout_p, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, _grad_xa):
    x, xa, weight, lora_A, lora_B, seed = ctx.saved_tensors
    scaling, dropout_p, backend = ctx.hyper
    needs = ctx.needs_input_grad
    needs_dbias = ctx.has_bias and needs[2]
    grads = _lora_linear_backward_op(
        grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, needs[0], needs[1], needs_dbias, backend
    )
    return none_if_skipped(grads, (needs[0], needs[1], needs_dbias, needs[3], needs[4])) + (None,) * 4


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API


def check_lora_inputs(op, x, weight, bias, lora_A, lora_B, scaling, dropout_p, **vectors):
    """The checks of a LoRA-style op `op` (lora_linear, dora_linear): each bad input raises an
    error naming it. vectors: the op's further [out_features] tensors (DoRA's magnitude), checked
    as bias is: shape, x's dtype and device."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    named.update(vectors)
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in_features], got a 0-dim tensor")
    for name in ("weight", "lora_A", "lora_B"):
        if named[name].dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(named[name].shape)}")
    in_features, out_features, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    if in_features == 0:
        raise ValueError(f"{op}: x has 0 input features (shape {tuple(x.shape)}); in_features must be >= 1")
    if weight.shape[1] != in_features:
        raise ValueError(
            f"{op}: x has {in_features} input features (shape {tuple(x.shape)}) but weight expects "
            f"{weight.shape[1]} (weight shape {tuple(weight.shape)} = [out_features, in_features])"
        )
    expected = {
        "weight": (out_features, in_features),
        "lora_A": (r, in_features),
        "lora_B": (out_features, r),
        **{name: (out_features,) for name in ("bias", *vectors)},
    }
    for name, shape in expected.items():
        if name in named and tuple(named[name].shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(named[name].shape)}")
    if r == 0:
        raise ValueError(f"{op}: lora_A has rank r=0; r must be >= 1")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; all tensors must share one dtype")
        if t.device != x.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but x is on {x.device}; all tensors must be on one device"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{op}: scaling must be a Python number, got {scaling!r}")


def lora_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float = 0.0, *, backend: Optional[str] = None,
) -> Tensor:
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ through the chosen backend.

    backend: "torch", "cpu", "triton", "cuda", "auto" (the fastest for this shape, measured once:
    lowrank.autotune), or None (LOWRANK_BACKEND, else "auto"). Pass dropout_p=0 at inference.
    """
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    check_lora_inputs("lora_linear", x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    backend = _backends.resolve(backend, x.device, "lora_linear")
    lead_shape, x2d = x.shape[:-1], x.reshape(-1, x.shape[-1])
    tensors = (x, weight, bias, lora_A, lora_B)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad and dropout_p == 0.0:
        y = _lora_linear_inference_op(x2d, weight, bias, lora_A, lora_B, float(scaling), backend)
    else:
        seed = torch.randint(0, 2**31 - 1, (), device=x.device) if dropout_p > 0.0 else None
        y, _ = _lora_linear_op(x2d, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed, backend)
    return y.reshape(*lead_shape, weight.shape[0])
