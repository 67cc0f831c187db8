"""Triton backend of lowrank.ops.grad_reverse's backward (see that module for the contract).

One kernel, out[i] = −λ·grad[src(i)], over a grid-stride loop. A dense gradient (its elements
fill consecutive memory in any dim order) is walked as flat memory, and its output gets the
same strides, so src(i) = i; any other gradient (a slice, an expanded stride-0 gradient) is
read through its sizes and strides, with mergeable dims merged first, into a contiguous output.
In place is the dense walk with out = grad.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank import _backends
from lowrank.ops.grad_reverse import is_dense

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The kernel spells out this many dims; a gradient that still has more after merging is made
# contiguous first (an extra pass, for a layout no autograd formula produces in practice).
MAX_DIMS = 6


@triton.jit
def _dim_offset(rem, offset, size, stride):
    # Peel the innermost remaining dim off a row-major linear index.
    return rem // size, offset + (rem % size) * stride


@triton.jit
def _grad_reverse_kernel(
    grad_ptr, out_ptr, lambda_ptr, lambda_value: tl.float64, numel,
    size1, size2, size3, size4, size5,
    stride0, stride1, stride2, stride3, stride4, stride5,
    NDIM: tl.constexpr, LAMBDA_ON_DEVICE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[i] = −λ·grad[src(i)] for i < numel, out contiguous in the walk order.

    NDIM == 0: src(i) = i. Else grad's NDIM dims sit right-aligned in slots 0..5 (slot 5
    innermost) and src(i) is the row-major index i mapped through their strides."""
    if LAMBDA_ON_DEVICE:
        neg_lambda = -tl.load(lambda_ptr).to(ACC_DTYPE)
    else:
        neg_lambda = -tl.full((), lambda_value, ACC_DTYPE)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, step):
        offsets = start + tl.arange(0, BLOCK)
        in_range = offsets < numel
        if NDIM == 0:
            src = offsets
        else:
            rem, src = _dim_offset(offsets, offsets * 0, size5, stride5)
            if NDIM >= 2:
                rem, src = _dim_offset(rem, src, size4, stride4)
            if NDIM >= 3:
                rem, src = _dim_offset(rem, src, size3, stride3)
            if NDIM >= 4:
                rem, src = _dim_offset(rem, src, size2, stride2)
            if NDIM >= 5:
                rem, src = _dim_offset(rem, src, size1, stride1)
            src += rem * stride0  # the index left over is slot 0's (0 unless NDIM == 6)
        grad = tl.load(grad_ptr + src, mask=in_range, other=0.0)
        tl.store(out_ptr + offsets, (grad.to(ACC_DTYPE) * neg_lambda).to(grad.dtype), mask=in_range)


# ---------------------------------------------------------------- host side


def _config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, max programs, num_warps): on the GPU, enough programs to fill every SM a few
    times over; in the interpreter, blocks small enough that test sizes loop several times."""
    if _backends.triton_interpret():
        return 64, 3, 1
    return 2048, 8 * _backends.multiprocessor_count(device), 8


def _merged_dims(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """t's sizes and strides with size-1 dims dropped and row-major-adjacent dims merged."""
    sizes, strides = [], []
    for size, stride in zip(t.shape, t.stride()):
        if size == 1:
            continue
        if sizes and strides[-1] == stride * size:
            sizes[-1] *= size
            strides[-1] = stride
        else:
            sizes.append(size)
            strides.append(stride)
    return sizes, strides


def _check(grad: torch.Tensor, lambda_: torch.Tensor) -> None:
    if grad.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"grad_reverse (triton): dtype {grad.dtype} is not supported; use float16, bfloat16, float32 or float64"
        )
    if lambda_.device.type != "cpu" and lambda_.device != grad.device:
        raise ValueError(f"grad_reverse (triton): lambda_ is on {lambda_.device} but grad is on {grad.device}")


def _launch(grad: torch.Tensor, out: torch.Tensor, lambda_: torch.Tensor, sizes=(), strides=()) -> None:
    """out (flat) = −λ·grad, grad read flat when no sizes are given, else through sizes/strides."""
    block, max_programs, num_warps = _config(grad.device)
    # A CPU λ is read on the host (no device sync); a device λ through its pointer (no sync either).
    on_device = lambda_.device.type != "cpu"
    pad = MAX_DIMS - len(sizes)
    padded_sizes, padded_strides = [1] * pad + list(sizes), [0] * pad + list(strides)
    _grad_reverse_kernel[(min(triton.cdiv(grad.numel(), block), max_programs),)](
        grad, out, lambda_ if on_device else grad, 0.0 if on_device else lambda_.item(), grad.numel(),
        *padded_sizes[1:], *padded_strides,
        NDIM=len(sizes), LAMBDA_ON_DEVICE=on_device,
        ACC_DTYPE=tl.float64 if grad.dtype == torch.float64 else tl.float32,
        BLOCK=block, num_warps=num_warps,
    )


def backward(grad: torch.Tensor, lambda_: torch.Tensor) -> torch.Tensor:
    """−λ·grad into torch.empty_like(grad): grad's strides if grad is dense, else dense in grad's dim order."""
    _check(grad, lambda_)
    out = torch.empty_like(grad)
    if grad.numel() == 0:
        return out
    if is_dense(grad):
        _launch(grad, out, lambda_)
        return out
    # out is dense: walk it in memory order, reading grad through its strides in that order.
    order = sorted(range(out.dim()), key=out.stride, reverse=True)
    sizes, strides = _merged_dims(grad.permute(order))
    if len(sizes) > MAX_DIMS:
        _launch(grad.permute(order).contiguous(), out, lambda_)
    else:
        _launch(grad, out, lambda_, sizes, strides)
    return out


def backward_(grad: torch.Tensor, lambda_: torch.Tensor) -> None:
    """grad ← −λ·grad; grad must be dense (no overlapping elements)."""
    _check(grad, lambda_)
    if not is_dense(grad):
        raise ValueError(
            f"grad_reverse (triton): in place needs a dense gradient, got shape {tuple(grad.shape)} "
            f"with strides {grad.stride()}"
        )
    if grad.numel():
        _launch(grad, grad, lambda_)
