"""Fused adapter bottleneck: out = h + scaling·(act(h·W_dᵀ + b_d)·W_uᵀ + b_u).

h [..., D], w_down [Bn, D], b_down [Bn] or None, w_up [D, Bn], b_up [D] or None;
act is relu, gelu (exact, erf) or silu. residual=False drops the `h +`.

The op is `torch.ops.lowrank.adapter` (custom op with fake and autograd registrations, so
opcheck and torch.compile(fullgraph=True) work). It dispatches to one of four backends, each
implementing the same two functions:

    forward(h, w_down, b_down, w_up, b_up, activation, s, residual)      -> (out, z)
                                                        z = h·W_dᵀ + b_d  [M, Bn]
    backward(g, h, z, w_down, w_up, activation, s, residual,
             needs_dh, needs_dw_down, needs_db_down, needs_dw_up, needs_db_up)
                                        -> (dh, dw_down, db_down, dw_up, db_up)

    a  = act(z)            dz = s·(g·W_u) ⊙ act'(z)
    dh = [g +] dz·W_d      dW_d = dzᵀ·h      db_d = Σ_rows dz
    dW_u = s·gᵀ·a          db_u = s·Σ_rows g

Only h and z are saved for backward; act(z) and act'(z) are recomputed from z, which is
[M, Bn] (small) where a saved act(z) would be a second one. Gradients that are not needed
may come back as None (as empty tensors through the custom ops).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lowrank import _backends, autotune
from lowrank.ops._common import autocast_inputs
from lowrank.ops._dispatch import (
    OpBackends,
    empty_if_skipped,
    fake_gradients,
    none_if_skipped,
    random_maker,
    register_fakes,
)

ACTIVATIONS = ("relu", "gelu", "silu")


def activation_fn(name: str):
    """act as a function of a tensor; gelu is the exact (erf) form, like torch's default."""
    return {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}[name]


def activation_derivative(name: str, z: Tensor) -> Tensor:
    """act'(z), elementwise, in z's dtype (computed in fp32 for half types)."""
    zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if name == "relu":
        d = (zf > 0).to(zf.dtype)
    elif name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(zf * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * zf * zf) * (1.0 / math.sqrt(2.0 * math.pi))
        d = cdf + zf * pdf
    else:
        sig = torch.sigmoid(zf)
        d = sig * (1.0 + zf * (1.0 - sig))
    return d.to(z.dtype)


def adapter_reference(
    h: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
    activation: str = "relu", scaling: float = 1.0, residual: bool = True,
) -> Tensor:
    """Plain autograd formula: the oracle for tests (any leading dims)."""
    a = activation_fn(activation)(torch.nn.functional.linear(h, w_down, b_down))
    delta = scaling * torch.nn.functional.linear(a, w_up, b_up)
    return h + delta if residual else delta


# ---------------------------------------------------------------- torch backend


def _torch_forward(h, w_down, b_down, w_up, b_up, activation, scaling, residual):
    z = torch.addmm(b_down, h, w_down.t()) if b_down is not None else h @ w_down.t()
    # s scales a = act(z), never a GEMM's alpha or beta: BLAS skips the product at alpha=0 and the
    # input at beta=0, which would hide a NaN in W_u or b_u that the formula propagates.
    a_s = activation_fn(activation)(z).mul_(scaling)
    if residual:
        base = h if b_up is None else h.add(b_up, alpha=scaling)
    else:
        base = None if b_up is None else b_up * scaling
    out = torch.mm(a_s, w_up.t()) if base is None else torch.addmm(base, a_s, w_up.t())
    return out, z


def _torch_backward(grad_out, h, z, w_down, w_up, activation, scaling, residual,
                    needs_dh, needs_dw_down, needs_db_down, needs_dw_up, needs_db_up):
    dh = dw_down = db_down = dw_up = db_up = None
    dz = (grad_out @ w_up).mul_(activation_derivative(activation, z)).mul_(scaling)
    if needs_dh:
        dh = torch.addmm(grad_out, dz, w_down) if residual else dz @ w_down
    if needs_dw_down:
        dw_down = dz.t() @ h
    if needs_db_down:
        db_down = dz.sum(0)
    if needs_dw_up:
        dw_up = (grad_out.t() @ activation_fn(activation)(z)).mul_(scaling)
    if needs_db_up:
        db_up = grad_out.sum(0).mul_(scaling)
    return dh, dw_down, db_down, dw_up, db_up


_BACKENDS = OpBackends("adapter", dict(forward=_torch_forward, backward=_torch_backward))


def _implementation_for(backend: str, h: Tensor, w_down: Tensor, activation: str):
    """The implementation of `backend` ("auto": the fastest for this problem, measured once)."""
    (M, D), Bn = h.shape, w_down.shape[0]
    rows = autotune.bucket(M)

    def step_for(name: str):
        implementation = _BACKENDS.implementation(name)
        make = random_maker(h)
        h_, grad_out = make(rows, D), make(rows, D)
        w_down_, b_down_, w_up_, b_up_ = make(Bn, D), make(Bn), make(D, Bn), make(D)

        def step():
            _, z = implementation.forward(h_, w_down_, b_down_, w_up_, b_up_, activation, 0.5, True)
            implementation.backward(
                grad_out, h_, z, w_down_, w_up_, activation, 0.5, True, True, True, True, True, True
            )

        return step

    key = ("adapter", str(h.device), str(h.dtype), rows, D, Bn, activation)
    return _BACKENDS.choose(backend, key, h.device, step_for)


# ---------------------------------------------------------------- custom op


# Every custom op takes `backend` last, so one fake serves it and its C++ op (register_fakes).


@torch.library.custom_op("lowrank::adapter", mutates_args=())
def _adapter_op(
    h: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor], activation: str,
    scaling: float, residual: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    return _implementation_for(backend, h, w_down, activation).forward(
        h, w_down, b_down, w_up, b_up, activation, scaling, residual
    )


def _forward_fake(h, w_down, b_down, w_up, b_up, activation, scaling, residual):
    return h.new_empty(h.shape[0], w_up.shape[0]), h.new_empty(h.shape[0], w_down.shape[0])


register_fakes(_adapter_op, _forward_fake, "adapter_forward_native")


@torch.library.custom_op("lowrank::adapter_backward", mutates_args=())
def _adapter_backward_op(
    grad_out: Tensor, h: Tensor, z: Tensor, w_down: Tensor, w_up: Tensor, activation: str, scaling: float,
    residual: bool, needs_dh: bool, needs_dw_down: bool, needs_db_down: bool, needs_dw_up: bool, needs_db_up: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    needed = (needs_dh, needs_dw_down, needs_db_down, needs_dw_up, needs_db_up)
    grads = _implementation_for(backend, h, w_down, activation).backward(
        grad_out, h, z, w_down, w_up, activation, scaling, residual, *needed
    )
    return empty_if_skipped(grads, needed, grad_out)


def _backward_fake(grad_out, h, z, w_down, w_up, activation, scaling, residual, *needed):
    Bn, D = w_down.shape
    return fake_gradients(grad_out, (h.shape, (Bn, D), (Bn,), (D, Bn), (D,)), needed)


register_fakes(_adapter_backward_op, _backward_fake, "adapter_backward_native")


def _setup_context(ctx, inputs, output):
    h, w_down, b_down, w_up, b_up, activation, scaling, residual, backend = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(h, z, w_down, w_up)
    ctx.hyper = (activation, scaling, residual, backend)
    ctx.has_bias = (b_down is not None, b_up is not None)


def _backward(ctx, grad_out, _grad_z):
    h, z, w_down, w_up = ctx.saved_tensors
    activation, scaling, residual, backend = ctx.hyper
    needs = ctx.needs_input_grad
    needed = (needs[0], needs[1], ctx.has_bias[0] and needs[2], needs[3], ctx.has_bias[1] and needs[4])
    grads = _adapter_backward_op(grad_out, h, z, w_down, w_up, activation, scaling, residual, *needed, backend)
    return none_if_skipped(grads, needed) + (None,) * 4


_adapter_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API


def _check_inputs(h, w_down, b_down, w_up, b_up, activation, scaling, residual):
    if activation not in ACTIVATIONS:
        raise ValueError(f"adapter: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"adapter: scaling must be a Python number, got {type(scaling).__name__}")
    if not isinstance(residual, bool):
        raise TypeError(f"adapter: residual must be a bool, got {type(residual).__name__}")
    named = {"h": h, "w_down": w_down, "w_up": w_up}
    if b_down is not None:
        named["b_down"] = b_down
    if b_up is not None:
        named["b_up"] = b_up
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"adapter: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"adapter: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if h.dim() < 1:
        raise ValueError("adapter: h must have at least one dimension [..., dim], got a 0-dim tensor")
    for name in ("w_down", "w_up"):
        if named[name].dim() != 2:
            raise ValueError(f"adapter: {name} must be 2-D, got shape {tuple(named[name].shape)}")
    dim, bottleneck = h.shape[-1], w_down.shape[0]
    if w_down.shape[1] != dim:
        raise ValueError(
            f"adapter: h has dim {dim} (shape {tuple(h.shape)}) but w_down expects {w_down.shape[1]} "
            f"(w_down shape {tuple(w_down.shape)} = [bottleneck, dim])"
        )
    if bottleneck == 0:
        raise ValueError("adapter: w_down has bottleneck 0 (shape [0, dim]); the bottleneck must be >= 1")
    if bottleneck > dim:
        raise ValueError(
            f"adapter: bottleneck {bottleneck} is larger than dim {dim} (w_down shape {tuple(w_down.shape)}); "
            "an adapter bottleneck must be at most the model dimension"
        )
    expected = {"w_up": (dim, bottleneck), "b_down": (bottleneck,), "b_up": (dim,)}
    meaning = {"w_up": "[dim, bottleneck]", "b_down": "[bottleneck]", "b_up": "[dim]"}
    for name, shape in expected.items():
        if name in named and tuple(named[name].shape) != shape:
            raise ValueError(
                f"adapter: {name} must have shape {meaning[name]} = {shape}, got {tuple(named[name].shape)}"
            )
    for name, t in named.items():
        if t.dtype != h.dtype:
            raise TypeError(
                f"adapter: {name} has dtype {t.dtype} but h has {h.dtype}; all tensors must share one dtype"
            )
        if t.device != h.device:
            raise ValueError(
                f"adapter: {name} is on {t.device} but h is on {h.device}; all tensors must be on one device"
            )


def adapter(
    h: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
    activation: str = "relu", scaling: float = 1.0, residual: bool = True, *, backend: Optional[str] = None,
) -> Tensor:
    """out = h + scaling·(act(h·W_dᵀ + b_d)·W_uᵀ + b_u) (no `h +` when residual=False).

    backend: "torch", "cpu", "triton", "cuda", "auto" (the fastest for this shape, measured once:
    lowrank.autotune), or None (LOWRANK_BACKEND, else "auto").
    """
    h, w_down, b_down, w_up, b_up = autocast_inputs(h, w_down, b_down, w_up, b_up)
    _check_inputs(h, w_down, b_down, w_up, b_up, activation, scaling, residual)
    backend = _backends.resolve(backend, h.device, "adapter")
    lead_shape = h.shape[:-1]
    out, _ = _adapter_op(
        h.reshape(-1, h.shape[-1]), w_down, b_down, w_up, b_up, activation, float(scaling), residual, backend
    )
    return out.reshape(*lead_shape, w_up.shape[0])
