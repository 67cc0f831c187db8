"""Fused DoRA linear (weight-decomposed LoRA, Liu et al. 2024), as HF PEFT 0.21 computes it.

x [..., K], W [N, K] frozen, b [N] or None, A [r, K], B [N, r], magnitude m [N] (PEFT's
lora_magnitude_vector), scaling s.

    n = ‖W + s·B·A‖ of each output row (over the K inputs): a constant, no gradient flows
        through it (the DoRA paper's section 4.3, PEFT's weight_norm.detach())
    g = m / n, and g = 0 where n = 0 (a row without a direction outputs its bias alone and
        passes no gradient; PEFT would give inf and NaN there); a NaN in n stays NaN in g
    z = x·Wᵀ + s·xa·Bᵀ,  xa = x·Aᵀ
    y = g ⊙ z + b                                                          (dropout_p = 0)

With dropout D (keep mask / (1-p), lowrank.ops.hash_dropout) PEFT's training forward feeds
D⊙x to the DoRA term only, the base layer still sees x:

    y = x·Wᵀ + b + (g − 1) ⊙ (D⊙x)·Wᵀ + g ⊙ s·(D⊙x)·Aᵀ·Bᵀ
      = x·Wᵀ + b + (g − 1) ⊙ z_D + s·xa·Bᵀ,   z_D = (D⊙x)·Wᵀ + s·xa·Bᵀ,  xa = (D⊙x)·Aᵀ

so it takes two GEMMs over W where dropout_p = 0 takes one.

The norm never forms W + s·B·A:

    n² = ‖W‖²_row + Σ_r B ⊙ (2s·W·Aᵀ + s²·B·(A·Aᵀ))        clamped at 0 against rounding

from ‖W‖²_row (weight_norm_sq: cached by the caller for a frozen W, see WeightNormCache, or
computed per call), W·Aᵀ [N, r] (one pass over W) and A·Aᵀ [r, r]. It is accumulated in fp32
(fp64 for fp64 inputs), and so are g and the norm the op returns. The scaling multiplies small
factors (xa, dy·B, A·Aᵀ), never a GEMM's alpha or beta, which BLAS would take as leave to skip an
operand: a NaN in A or B propagates at s = 0 as the formula says.

Gradients, with G = g ⊙ dy (each column j of dy scaled by g_j):

    dyB = G·B    dx = G·W + s·dyB·A    dA = s·dyBᵀ·x    dB = s·Gᵀ·xa    dW = Gᵀ·x    db = Σ_rows dy
    dm  = Σ_rows dy ⊙ z / n
With dropout, H = (g − 1) ⊙ dy:
    dx = dy·W + D⊙(H·W + s·dyB·A)    dA = s·dyBᵀ·(D⊙x)    dW = dyᵀ·x + Hᵀ·(D⊙x)    dm = Σ_rows dy ⊙ z_D / n

Saved for backward: x, xa [M, r], the norm [N] and, for dm, the output y when dropout_p = 0:
z = (y − b)/g is recovered where g ≠ 0, so no [M, N] tensor is kept beyond y itself (autograd
raises, as for torch.exp, if y is later changed in place) and the backward adds one read of y
and dy; columns with g = 0 recompute z from x, W, xa and B (exact, and rare). The recovery's
rounding error is ε·(|g·z| + |b|)/|g| per element: the same as PEFT's own base_result − bias
for g ≈ 1. With dropout_p > 0 y cannot give z_D, so z_D [M, N] is saved (an [M, N] tensor more).
The dropout mask is rebuilt from the seed.

The ops are `torch.ops.lowrank.dora_linear` and `dora_linear_backward` (custom ops with fake and
autograd registrations), and `dora_linear_inference` when no gradient is needed and there is no
dropout. Every backend implements:

    forward(x, W, b, A, B, m, wn², s, p, seed)   -> (y, xa, norm, z_D)      z_D: empty when p = 0
    backward(dy, x, xa, y_or_z, W, b, A, B, m, norm, s, p, seed, needs_dx, needs_dweight, needs_dbias)
                                                 -> (dx, dW, db, dA, dB, dm)
    inference(x, W, b, A, B, m, wn², s)          -> y

Merging (exact, for zero-overhead inference): W' = g ⊙ (W + s·B·A) with the g of the unmerged
weight (dora_merged_weight); unmerging: W = W'/g − s·B·A with that same g (dora_unmerged_weight),
since n is a function of the unmerged W and cannot be recomputed from W'.
"""

from __future__ import annotations

import weakref
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
from lowrank.ops.lora_linear import check_lora_inputs


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the norm, ‖W‖²_row and g: fp64 for fp64 inputs, fp32 for every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dora_linear_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    scaling: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> Tensor:
    """PEFT's formula in plain autograd, with W + s·B·A materialised and its norm detached: the
    oracle for tests (any leading dims)."""
    x_lora = x
    if dropout_p > 0.0:
        x2d = x.reshape(-1, x.shape[-1])
        x_lora = hash_dropout.apply(x2d, seed, dropout_p).reshape(x.shape)
    norm = torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
    zero = norm == 0  # g = 0 there; the inner where keeps m/0 out of the gradient
    scale = torch.where(zero, 0.0, magnitude / torch.where(zero, 1.0, norm))
    base = torch.nn.functional.linear(x, weight, bias)
    low_rank = (x_lora @ lora_A.t()) @ lora_B.t()
    return base + (scale - 1) * torch.nn.functional.linear(x_lora, weight) + scale * scaling * low_rank


# ---------------------------------------------------------------- shared pieces


def weight_row_norm_sq(weight: Tensor) -> Tensor:
    """‖W‖² of each row [N] (no gradient), accumulated in accumulate_dtype: one pass over W."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=accumulate_dtype(weight.dtype)).square_()


class WeightNormCache:
    """weight_row_norm_sq of a frozen weight, recomputed only when the weight changes: the cached
    value is tied to the tensor object (a view's base, so weight.t() of a parameter hits too), its
    data pointer and its version counter, which every in-place change bumps (a merge, an optimizer
    step, load_state_dict). Under torch.compile it computes afresh: the version counter cannot be
    traced, and the row reduction is a small part of the compiled graph."""

    def __init__(self):
        self._key: Optional[tuple] = None
        self._owner: Optional[weakref.ref] = None
        self._value: Optional[Tensor] = None

    def __call__(self, weight: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return weight_row_norm_sq(weight)
        owner = weight if weight._base is None else weight._base
        key = (weight.data_ptr(), weight._version, weight.shape, weight.stride(), weight.dtype, weight.device)
        if self._owner is None or self._owner() is not owner or key != self._key:
            self._value = weight_row_norm_sq(weight)
            self._owner, self._key = weakref.ref(owner), key
        return self._value

    def __getstate__(self) -> dict:
        """Pickled (torch.save of a module, deepcopy) empty: a weakref cannot be pickled, and a copy's
        weight is another tensor anyway."""
        return {"_key": None, "_owner": None, "_value": None}


def column_norm(weight_norm_sq: Tensor, weight_times_a: Tensor, lora_A: Tensor, lora_B: Tensor,
                scaling: float) -> Tensor:
    """n = ‖W + s·B·A‖_row [N] from ‖W‖²_row and W·Aᵀ [N, r], in weight_norm_sq's dtype."""
    acc = weight_norm_sq.dtype
    A, B = lora_A.to(acc), lora_B.to(acc)
    cross = torch.addmm(weight_times_a.to(acc) * (2.0 * scaling), B, (A @ A.t()) * (scaling * scaling))
    return (weight_norm_sq + (B * cross).sum(1)).clamp_min_(0.0).sqrt_()


def column_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """g = m / n, 0 where n = 0 (NaN where n is), in the norm's dtype."""
    return torch.where(norm == 0, 0.0, magnitude.to(norm.dtype) / norm)


def magnitude_grad(dy_z: Tensor, norm: Tensor, dtype: torch.dtype) -> Tensor:
    """dm = Σ_rows dy ⊙ z / n [N] from dy_z = Σ_rows dy ⊙ z; 0 where n = 0."""
    return torch.where(norm == 0, 0.0, dy_z / norm).to(dtype)


def unscale_recovered(dots: Tensor, scale: Tensor) -> Tensor:
    """Σ_rows dy ⊙ z from dots = Σ_rows dy ⊙ (y − b) = g·Σ_rows dy ⊙ z where g ≠ 0; where g = 0
    dots must already hold Σ_rows dy ⊙ z (z recomputed: y − b = b − b carries nothing)."""
    return torch.where(scale != 0, dots / scale, dots)


def zero_scale_columns(scale: Tensor, norm: Tensor) -> Tensor:
    """The columns whose z cannot be recovered from y (g = 0 but n > 0), as indices."""
    return ((scale == 0) & (norm > 0)).nonzero().squeeze(1)


# ---------------------------------------------------------------- torch backend


def _torch_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, scaling, dropout_p, seed):
    norm = column_norm(weight_norm_sq, weight @ lora_A.t(), lora_A, lora_B, scaling)
    scale = column_scale(magnitude, norm)
    if dropout_p == 0.0:
        xa = x @ lora_A.t()
        z = torch.nn.functional.linear(x, weight).addmm_(xa * scaling, lora_B.t())
        y = z.mul_(scale.to(x.dtype)) if bias is None else torch.addcmul(bias, z, scale.to(x.dtype))
        return y, xa, norm, x.new_empty(0)
    x_drop = hash_dropout.apply(x, seed, dropout_p)
    xa = x_drop @ lora_A.t()
    scaled_xa = xa * scaling
    z = torch.nn.functional.linear(x_drop, weight).addmm_(scaled_xa, lora_B.t())
    # g − 1 in the accumulate dtype: in bf16, g near 1 would round it to 0.
    y = torch.nn.functional.linear(x, weight, bias).addcmul_(z, (scale - 1).to(x.dtype))
    return y.addmm_(scaled_xa, lora_B.t()), xa, norm, z


def _torch_magnitude_dots(grad_y, y, x, xa, weight, bias, lora_B, scaling, scale, norm):
    """Σ_rows dy ⊙ (y − b), and Σ_rows dy ⊙ z for the columns with g = 0 (z recomputed)."""
    acc = norm.dtype
    centred = y if bias is None else y - bias
    dots = (grad_y.to(acc) * centred.to(acc)).sum(0)
    columns = zero_scale_columns(scale, norm)
    if columns.numel():
        z = (x @ weight[columns].t()).addmm_(xa * scaling, lora_B[columns].t())
        dots[columns] = (grad_y[:, columns].to(acc) * z.to(acc)).sum(0)
    return dots


def _torch_backward(
    grad_y, x, xa, y_or_z, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
    needs_dx, needs_dweight, needs_dbias,
):
    scale = column_scale(magnitude, norm)
    scaled_grad = grad_y * scale.to(x.dtype)
    dyB_s = (scaled_grad @ lora_B).mul_(scaling)  # s on the small factor (see _torch_forward)
    dB = (scaled_grad.t() @ xa).mul_(scaling)
    dx = dW = db = None
    if dropout_p == 0.0:
        dA = dyB_s.t() @ x
        if needs_dx:
            dx = (scaled_grad @ weight).addmm_(dyB_s, lora_A)
        if needs_dweight:
            dW = scaled_grad.t() @ x
        dy_z = unscale_recovered(
            _torch_magnitude_dots(grad_y, y_or_z, x, xa, weight, bias, lora_B, scaling, scale, norm), scale
        )
    else:
        keep = hash_dropout.keep_mask(seed, x.shape[0], x.shape[1], dropout_p)
        x_drop = hash_dropout.apply_mask(x, keep, dropout_p)
        shifted_grad = grad_y * (scale - 1).to(x.dtype)
        dA = dyB_s.t() @ x_drop
        if needs_dx:
            masked = (shifted_grad @ weight).addmm_(dyB_s, lora_A)
            dx = (grad_y @ weight).add_(hash_dropout.apply_mask(masked, keep, dropout_p))
        if needs_dweight:
            dW = (grad_y.t() @ x).add_(shifted_grad.t() @ x_drop)
        dy_z = (grad_y.to(norm.dtype) * y_or_z.to(norm.dtype)).sum(0)
    if needs_dbias:
        db = grad_y.sum(0)
    return dx, dW, db, dA, dB, magnitude_grad(dy_z, norm, magnitude.dtype)


_BACKENDS = OpBackends("dora_linear", dict(forward=_torch_forward, backward=_torch_backward),
                       inference_from_forward=True)


def _implementation_for(backend: str, x: Tensor, weight: Tensor, lora_A: Tensor, dropout_p: float):
    """The implementation of `backend` ("auto": the fastest for this problem, measured once)."""
    (M, K), N, r = x.shape, weight.shape[0], lora_A.shape[0]
    rows = autotune.bucket(M)

    make = random_maker(x)

    def step_for(name: str):
        implementation = _BACKENDS.implementation(name)
        x_, weight_, bias_, A_, B_, m_, grad_y = make(rows, K), make(N, K), make(N), make(r, K), make(N, r), \
            make(N), make(rows, N)
        norm_sq = weight_row_norm_sq(weight_)
        seed = torch.zeros((), dtype=torch.int64, device=x.device) if dropout_p > 0.0 else None

        def step():
            y, xa, norm, z = implementation.forward(x_, weight_, bias_, A_, B_, m_, norm_sq, 0.5, dropout_p, seed)
            implementation.backward(grad_y, x_, xa, z if dropout_p > 0.0 else y, weight_, bias_, A_, B_, m_, norm,
                                    0.5, dropout_p, seed, True, False, False)

        return step

    key = ("dora_linear", str(x.device), str(x.dtype), rows, K, N, r, dropout_p > 0.0)
    return _BACKENDS.choose(backend, key, x.device, step_for)


# ---------------------------------------------------------------- custom op


# Every custom op takes `backend` last, so one fake serves it and its C++ op (register_fakes).


@torch.library.custom_op("lowrank::dora_linear", mutates_args=())
def _dora_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    weight_norm_sq: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _implementation_for(backend, x, weight, lora_A, dropout_p).forward(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, scaling, dropout_p, seed
    )


def _forward_fake(x, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, scaling, dropout_p, seed):
    M, N = x.shape[0], weight.shape[0]
    return (
        x.new_empty(M, N),
        x.new_empty(M, lora_A.shape[0]),
        x.new_empty(N, dtype=accumulate_dtype(x.dtype)),
        x.new_empty(M, N) if dropout_p > 0.0 else x.new_empty(0),
    )


register_fakes(_dora_linear_op, _forward_fake, "dora_linear_forward_native")


@torch.library.custom_op("lowrank::dora_linear_backward", mutates_args=())
def _dora_linear_backward_op(
    grad_y: Tensor, x: Tensor, xa: Tensor, y_or_z: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
    lora_B: Tensor, magnitude: Tensor, norm: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
    needs_dx: bool, needs_dweight: bool, needs_dbias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _implementation_for(backend, x, weight, lora_A, dropout_p).backward(
        grad_y, x, xa, y_or_z, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
        needs_dx, needs_dweight, needs_dbias,
    )
    return empty_if_skipped(grads, (needs_dx, needs_dweight, needs_dbias, True, True, True), grad_y)


def _backward_fake(grad_y, x, xa, y_or_z, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
                   *needed):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape, magnitude.shape)
    return fake_gradients(grad_y, shapes, (*needed, True, True, True))  # dA, dB and dm are always computed


register_fakes(_dora_linear_backward_op, _backward_fake, "dora_linear_backward_native")


@torch.library.custom_op("lowrank::dora_linear_inference", mutates_args=())
def _dora_linear_inference_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    weight_norm_sq: Tensor, scaling: float, backend: str,
) -> Tensor:
    """Forward only (no gradient, no dropout): nothing is saved."""
    return _implementation_for(backend, x, weight, lora_A, 0.0).inference(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, scaling
    )


register_fakes(_dora_linear_inference_op, lambda x, weight, *_: x.new_empty(x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, scaling, dropout_p, seed, backend = inputs
    y, xa, norm, z = output
    ctx.mark_non_differentiable(xa, norm, z)
    ctx.save_for_backward(x, xa, z if dropout_p > 0.0 else y, weight, bias, lora_A, lora_B, magnitude, norm, seed)
    ctx.hyper = (scaling, dropout_p, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, _grad_xa, _grad_norm, _grad_z):
    x, xa, y_or_z, weight, bias, lora_A, lora_B, magnitude, norm, seed = ctx.saved_tensors
    scaling, dropout_p, backend = ctx.hyper
    needs = ctx.needs_input_grad
    needs_dbias = ctx.has_bias and needs[2]
    grads = _dora_linear_backward_op(
        grad_y, x, xa, y_or_z, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
        needs[0], needs[1], needs_dbias, backend,
    )
    return none_if_skipped(grads, (needs[0], needs[1], needs_dbias, needs[3], needs[4], needs[5])) + (None,) * 5


_dora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- helpers for modules


def dora_magnitude(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, weight_norm_sq: Optional[Tensor] = None
) -> Tensor:
    """n = ‖W + s·B·A‖_row [N] in weight's dtype, without forming W + s·B·A: the value PEFT
    initialises lora_magnitude_vector with (with B = 0 at init, ‖W‖_row)."""
    with torch.no_grad():
        norm_sq = weight_row_norm_sq(weight) if weight_norm_sq is None else weight_norm_sq
        return column_norm(norm_sq, weight @ lora_A.t(), lora_A, lora_B, scaling).to(weight.dtype)


def dora_merged_weight(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
    weight_norm_sq: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(W' = g ⊙ (W + s·B·A) in weight's dtype, g [N] in accumulate_dtype): an nn.Linear with
    weight W' and the same bias computes dora_linear's output (dropout off). Keep g to unmerge:
    dora_unmerged_weight(W', lora_A, lora_B, g, scaling) gives W back."""
    with torch.no_grad():
        acc = accumulate_dtype(weight.dtype)
        norm_sq = weight_row_norm_sq(weight) if weight_norm_sq is None else weight_norm_sq.to(acc)
        scale = column_scale(magnitude, column_norm(norm_sq, weight @ lora_A.t(), lora_A, lora_B, scaling))
        merged = torch.addmm(weight.to(acc), lora_B.to(acc) * scaling, lora_A.to(acc)).mul_(scale[:, None])
        return merged.to(weight.dtype), scale


def dora_unmerged_weight(merged: Tensor, lora_A: Tensor, lora_B: Tensor, scale: Tensor, scaling: float) -> Tensor:
    """W = W'/g − s·B·A, with g the scale dora_merged_weight returned with W'. A row merged with
    g = 0 is all zeros and its W is lost: ValueError."""
    with torch.no_grad():
        if (scale == 0).any():
            rows = (scale == 0).nonzero().squeeze(1).tolist()
            raise ValueError(f"dora_unmerged_weight: scale is 0 in rows {rows[:10]}; W cannot be recovered there")
        acc = scale.dtype
        weight = torch.addmm(merged.to(acc) / scale[:, None], lora_B.to(acc) * -scaling, lora_A.to(acc))
        return weight.to(merged.dtype)


# ---------------------------------------------------------------- public API


def _check_inputs(x, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, scaling, dropout_p):
    check_lora_inputs("dora_linear", x, weight, bias, lora_A, lora_B, scaling, dropout_p, magnitude=magnitude)
    if weight_norm_sq is None:
        return
    if not isinstance(weight_norm_sq, Tensor):
        raise TypeError(f"dora_linear: weight_norm_sq must be a torch.Tensor, got {type(weight_norm_sq).__name__}")
    if not weight_norm_sq.is_floating_point():
        raise TypeError(f"dora_linear: weight_norm_sq must be floating-point, got dtype {weight_norm_sq.dtype}")
    if tuple(weight_norm_sq.shape) != tuple(magnitude.shape):
        raise ValueError(
            f"dora_linear: weight_norm_sq must have shape {tuple(magnitude.shape)}, got {tuple(weight_norm_sq.shape)}"
        )
    if weight_norm_sq.device != x.device:
        raise ValueError(f"dora_linear: weight_norm_sq is on {weight_norm_sq.device} but x is on {x.device}; all "
                         "tensors must be on one device")


def dora_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    scaling: float, dropout_p: float = 0.0, *, weight_norm_sq: Optional[Tensor] = None, backend: Optional[str] = None,
) -> Tensor:
    """DoRA's y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, g = m / ‖W + s·B·A‖_row, through the chosen backend;
    with dropout_p > 0, PEFT's training forward (see the module docstring).

    weight_norm_sq: ‖W‖²_row [N] of the frozen weight (weight_row_norm_sq; a WeightNormCache keeps
    it across calls); None computes it, one more pass over W. It is never differentiated.
    backend: "torch", "cpu", "triton", "cuda", "auto" (the fastest for this shape, measured once:
    lowrank.autotune), or None (LOWRANK_BACKEND, else "auto"). Pass dropout_p=0 at inference.
    Under torch.autocast every tensor, magnitude included, runs in the autocast dtype; the norm
    and g are accumulated in fp32.
    """
    x, weight, bias, lora_A, lora_B, magnitude = autocast_inputs(x, weight, bias, lora_A, lora_B, magnitude)
    _check_inputs(x, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, scaling, dropout_p)
    backend = _backends.resolve(backend, x.device, "dora_linear")
    if weight_norm_sq is None:
        weight_norm_sq = weight_row_norm_sq(weight)
    else:
        weight_norm_sq = weight_norm_sq.detach().to(accumulate_dtype(x.dtype))
    lead_shape, x2d = x.shape[:-1], x.reshape(-1, x.shape[-1])
    tensors = (x, weight, bias, lora_A, lora_B, magnitude)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad and dropout_p == 0.0:
        y = _dora_linear_inference_op(
            x2d, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, float(scaling), backend
        )
    else:
        seed = torch.randint(0, 2**31 - 1, (), device=x.device) if dropout_p > 0.0 else None
        y = _dora_linear_op(x2d, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, float(scaling),
                            float(dropout_p), seed, backend)[0]
    return y.reshape(*lead_shape, weight.shape[0])
