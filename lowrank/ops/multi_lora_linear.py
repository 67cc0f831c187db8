"""Mixed-batch multi-adapter LoRA linear: every row of x goes through its own LoRA adapter.

x [..., K], W [N, K] (frozen), b [N] or None, adapter_index [...] (x's leading shape, int32 or
int64), lora_A [n, r, K], lora_B [n, N, r], scaling and dropout_p: one host number per adapter
(or one for all):

    y[i] = x[i]·Wᵀ + b + s[a]·(D_i⊙x[i])·A[a]ᵀ·B[a]ᵀ,        a = adapter_index[i]

A row with a = -1 gets no low-rank term and adds nothing to any adapter's gradient.

Ranks: r is the largest rank; an adapter of rank r_a < r is stored padded, with zero rows
r_a.. of A[a] and zero columns r_a.. of B[a]. Padded entries then get exactly zero gradient
(dA[a][j] = s·Σ dyB[:, j]ᵀ·x with dyB[:, j] = dy·B[a][:, j] = 0, and dB[a][:, j] = s·Σ dyᵀ·xa[:, j]
with xa[:, j] = x·A[a][j] = 0), so they stay zero under SGD, Adam and AdamW.
Dropout: D_i is lowrank's counter-based hash mask (hash_dropout) at row i's index in the batch,
with adapter a's rate and keep scale 1/(1 - p[a]); rows of one rate draw exactly the bits that
lora_linear draws with the same seed. Each adapter may have its own rate, as in PEFT.

The op is `torch.ops.lowrank.multi_lora_linear` (custom op with fake and autograd registrations,
so opcheck and torch.compile(fullgraph=True) work). Its backends implement:

    forward(x, W, b, index, A, B, s, p, seed)   -> (y, xa)      xa[i] = (D_i⊙x[i])·A[a]ᵀ  [M, r]
    backward(dy, x, xa, W, index, A, B, s, p, seed, needs_dx, needs_dweight, needs_dbias)
                                                -> (dx, dW, db, dA, dB)

    dyB[i] = dy[i]·B[a]             dx[i] = dy[i]·W + s[a]·D_i⊙(dyB[i]·A[a])
    dA[a]  = s[a]·Σ_{i of a} dyB[i]ᵀ·(D_i⊙x[i])     dB[a] = s[a]·Σ_{i of a} dy[i]ᵀ·xa[i]
    dW = dyᵀ·x     db = Σ_rows dy

Only x, xa and the index are saved; the dropout mask is rebuilt from `seed`. Each scaling
multiplies a small factor, never a GEMM's alpha, so a NaN in an adapter's A or B reaches that
adapter's rows at scaling 0 too, and no other rows (docs/multi-lora.md: NaN and inf). Each
backend groups the rows by adapter (a stable sort) in forward and again in backward: O(M)
beside the O(M·K) products. An adapter without rows gets zero gradients.
  torch   a loop over the adapters' row segments (index_select / index_add_); one host sync for
          the segment bounds
  cpu     counting sort; each segment in blocks gathered into cache and multiplied by AVX-512
          skinny kernels (fp32) or ATen (other dtypes); the low-rank term (and bias) is written
          into y and dx first, and MKL's GEMM accumulates the base product into them (beta = 1)
  triton  sorted rows: tiles of the base GEMM hold one or a few adapters, whose low-rank term
          seeds the accumulator; dA and dB are segmented reductions; no host sync
  cuda    ATen/cuBLAS in the binding, no custom GEMM kernel: the rank-r reductions as dense
          products over all n·r ranks, each row keeping its adapter's block (cost grows with
          n·r); the products back to y's and dx's width and the per-row dropout mask in small
          kernels that read each row's own adapter; no host sync
Index values are checked inside the op: on CPU exactly (ValueError naming the first bad row); on
CUDA by an asynchronous device assert (no host sync), with out-of-range rows treated as -1 until
it fires, so nothing is ever read out of bounds.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lowrank import _backends, autotune
from lowrank.ops import _dispatch, hash_dropout
from lowrank.ops._common import autocast_inputs

PerAdapter = Union[float, Sequence[float]]


def _per_adapter(name: str, value: PerAdapter, count: int) -> list[float]:
    """One float per adapter from a number (shared by all) or a sequence of `count` numbers."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return [float(value)] * count
    try:
        values = list(value)
    except TypeError:
        raise TypeError(
            f"multi_lora_linear: {name} must be a number or a sequence of {count} numbers (one per adapter), "
            f"got {type(value).__name__}"
        ) from None
    if len(values) != count or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        raise ValueError(
            f"multi_lora_linear: {name} must hold one number per adapter ({count}, lora_A.shape[0]), got {values!r}"
        )
    return [float(v) for v in values]


def multi_lora_linear_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], adapter_index: Tensor, lora_A: Tensor, lora_B: Tensor,
    scaling: PerAdapter, dropout_p: PerAdapter = 0.0, seed: Optional[Tensor] = None,
) -> Tensor:
    """Plain autograd formula, the oracle for tests: each adapter's term taken on its own rows
    and added at them, so nothing of an adapter (a NaN included) reaches another's rows, not
    even through the gradients (any leading dims)."""
    count = lora_A.shape[0]
    scalings, rates = _per_adapter("scaling", scaling, count), _per_adapter("dropout_p", dropout_p, count)
    x2d = x.reshape(-1, x.shape[-1])
    index = adapter_index.reshape(-1)
    y = torch.nn.functional.linear(x2d, weight, bias)
    for adapter in range(count):
        rows = (index == adapter).nonzero().squeeze(1)
        x_lora = hash_dropout.apply(x2d, seed, rates[adapter]) if rates[adapter] > 0.0 else x2d
        term = scalings[adapter] * ((x_lora[rows] @ lora_A[adapter].t()) @ lora_B[adapter].t())
        y = y.index_add(0, rows, term)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------- grouping rows by adapter


def _check_index_values(adapter_index: Tensor, count: int) -> None:
    """CPU: a ValueError naming the first row outside [-1, count). CUDA: an asynchronous device
    assert (no host sync); until it fires, the kernels treat such rows as -1."""
    bad = (adapter_index < -1) | (adapter_index >= count)
    message = f"multi_lora_linear: adapter_index must hold -1 (no adapter) or an adapter in [0, {count})"
    if adapter_index.device.type == "cpu":
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{message}; adapter_index[{row}] = {int(adapter_index[row])}")
    else:
        torch._assert_async(~bad.any(), message)


def group_rows(adapter_index: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(order, offsets): the row indices sorted by adapter (stable, so each adapter's rows keep
    their order), adapter a's rows at order[offsets[a]:offsets[a + 1]]. Rows with -1 (and out-of-
    range ones) lie outside every segment. No host sync."""
    _check_index_values(adapter_index, count)
    sorted_index, order = torch.sort(adapter_index, stable=True)
    bounds = torch.arange(count + 1, device=adapter_index.device, dtype=sorted_index.dtype)
    return order, torch.searchsorted(sorted_index, bounds)


# ---------------------------------------------------------------- torch backend


def _segments(adapter_index: Tensor, count: int) -> list[tuple[int, Tensor]]:
    """(adapter, its row indices) for every adapter with rows."""
    order, offsets = group_rows(adapter_index, count)
    bounds = offsets.tolist()
    return [(a, order[bounds[a]:bounds[a + 1]]) for a in range(count) if bounds[a + 1] > bounds[a]]


def _dropped(values: Tensor, rows: Tensor, seed: Optional[Tensor], p: float) -> Tensor:
    """D⊙values for the given rows of the batch (values: [len(rows), cols])."""
    if p == 0.0:
        return values
    return hash_dropout.apply_mask(values, hash_dropout.keep_mask_of_rows(seed, rows, values.shape[1], p), p)


def _torch_forward(x, weight, bias, adapter_index, lora_A, lora_B, scaling, dropout_p, seed):
    y = torch.nn.functional.linear(x, weight, bias)
    xa = x.new_zeros(x.shape[0], lora_A.shape[1])
    for adapter, rows in _segments(adapter_index, lora_A.shape[0]):
        xa_rows = _dropped(x.index_select(0, rows), rows, seed, dropout_p[adapter]) @ lora_A[adapter].t()
        xa.index_copy_(0, rows, xa_rows)
        # s scales the small factor, never an alpha: one may skip the product at 0, hiding a NaN in B.
        y.index_add_(0, rows, (xa_rows * scaling[adapter]) @ lora_B[adapter].t())
    return y, xa


def _torch_backward(
    grad_y, x, xa, weight, adapter_index, lora_A, lora_B, scaling, dropout_p, seed, needs_dx, needs_dweight,
    needs_dbias,
):
    dA, dB = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dx = grad_y @ weight if needs_dx else None
    for adapter, rows in _segments(adapter_index, lora_A.shape[0]):
        s, p = scaling[adapter], dropout_p[adapter]
        dy_rows = grad_y.index_select(0, rows)
        dyB_s = (dy_rows @ lora_B[adapter]).mul_(s)  # s on the small factor (see _torch_forward)
        dA[adapter] = dyB_s.t() @ _dropped(x.index_select(0, rows), rows, seed, p)
        dB[adapter] = (dy_rows.t() @ xa.index_select(0, rows)).mul_(s)
        if needs_dx:
            dx.index_add_(0, rows, _dropped(dyB_s @ lora_A[adapter], rows, seed, p))
    dW = grad_y.t() @ x if needs_dweight else None
    db = grad_y.sum(0) if needs_dbias else None
    return dx, dW, db, dA, dB


_BACKENDS = _dispatch.OpBackends("multi_lora_linear", dict(forward=_torch_forward, backward=_torch_backward))


def _implementation_for(backend: str, x: Tensor, weight: Tensor, lora_A: Tensor, dropout_p: list[float]):
    """The implementation of `backend` ("auto": the fastest for this problem, measured once with
    the rows spread uniformly over the adapters)."""
    (M, K), N, (count, r) = x.shape, weight.shape[0], lora_A.shape[:2]
    rows = autotune.bucket(M)
    dropout = any(p > 0.0 for p in dropout_p)

    make = _dispatch.random_maker(x)

    def step_for(name: str):
        implementation = _BACKENDS.implementation(name)
        x_, weight_, bias_, A_, B_, grad_y = (
            make(rows, K), make(N, K), make(N), make(count, r, K), make(count, N, r), make(rows, N))
        index = torch.randint(0, count, (rows,), device=x.device)
        scaling = [0.5] * count
        seed = torch.zeros((), dtype=torch.int64, device=x.device) if dropout else None

        def step():
            _, xa = implementation.forward(x_, weight_, bias_, index, A_, B_, scaling, dropout_p, seed)
            implementation.backward(grad_y, x_, xa, weight_, index, A_, B_, scaling, dropout_p, seed, True, False,
                                    False)

        return step

    key = ("multi_lora_linear", str(x.device), str(x.dtype), rows, K, N, r, count, dropout)
    return _BACKENDS.choose(backend, key, x.device, step_for)


# ---------------------------------------------------------------- custom op


# Every custom op takes `backend` last, so one fake serves it and its C++ op (register_fakes).


@torch.library.custom_op("lowrank::multi_lora_linear", mutates_args=())
def _multi_lora_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], adapter_index: Tensor, lora_A: Tensor, lora_B: Tensor,
    scaling: list[float], dropout_p: list[float], seed: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    return _implementation_for(backend, x, weight, lora_A, dropout_p).forward(
        x, weight, bias, adapter_index, lora_A, lora_B, scaling, dropout_p, seed
    )


def _forward_fake(x, weight, bias, adapter_index, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[1])


_dispatch.register_fakes(_multi_lora_linear_op, _forward_fake, "multi_lora_linear_forward_native")


@torch.library.custom_op("lowrank::multi_lora_linear_backward", mutates_args=())
def _multi_lora_linear_backward_op(
    grad_y: Tensor, x: Tensor, xa: Tensor, weight: Tensor, adapter_index: Tensor, lora_A: Tensor, lora_B: Tensor,
    scaling: list[float], dropout_p: list[float], seed: Optional[Tensor], needs_dx: bool, needs_dweight: bool,
    needs_dbias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _implementation_for(backend, x, weight, lora_A, dropout_p).backward(
        grad_y, x, xa, weight, adapter_index, lora_A, lora_B, scaling, dropout_p, seed, needs_dx, needs_dweight,
        needs_dbias,
    )
    return _dispatch.empty_if_skipped(grads, (needs_dx, needs_dweight, needs_dbias, True, True), grad_y)


def _backward_fake(grad_y, x, xa, weight, adapter_index, lora_A, lora_B, scaling, dropout_p, seed, *needed):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    return _dispatch.fake_gradients(grad_y, shapes, (*needed, True, True))  # dA and dB are always computed


_dispatch.register_fakes(_multi_lora_linear_backward_op, _backward_fake, "multi_lora_linear_backward_native")


def _setup_context(ctx, inputs, output):
    x, weight, bias, adapter_index, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, xa, weight, adapter_index, lora_A, lora_B, seed)
    ctx.hyper = (scaling, dropout_p, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, _grad_xa):
    x, xa, weight, adapter_index, lora_A, lora_B, seed = ctx.saved_tensors
    scaling, dropout_p, backend = ctx.hyper
    needs = ctx.needs_input_grad
    needs_dbias = ctx.has_bias and needs[2]
    grads = _multi_lora_linear_backward_op(
        grad_y, x, xa, weight, adapter_index, lora_A, lora_B, scaling, dropout_p, seed, needs[0], needs[1],
        needs_dbias, backend,
    )
    dx, dW, db, dA, dB = _dispatch.none_if_skipped(grads, (needs[0], needs[1], needs_dbias, needs[4], needs[5]))
    return dx, dW, db, None, dA, dB, None, None, None, None


_multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API


def _check_inputs(x, weight, bias, adapter_index, lora_A, lora_B, scaling, dropout_p) -> tuple[list, list]:
    """Every check that needs no look at tensor values; (scaling, dropout_p) as one float per adapter."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, t in {**named, "adapter_index": adapter_index}.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"multi_lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in named.items():
        if not t.is_floating_point():
            raise TypeError(f"multi_lora_linear: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() < 1:
        raise ValueError("multi_lora_linear: x must have at least one dimension [..., in_features], got a 0-dim tensor")
    for name, dims, meaning in (("weight", 2, "[out_features, in_features]"),
                                ("lora_A", 3, "[n_adapters, r, in_features]"),
                                ("lora_B", 3, "[n_adapters, out_features, r]")):
        if named[name].dim() != dims:
            raise ValueError(
                f"multi_lora_linear: {name} must be {dims}-D {meaning}, got shape {tuple(named[name].shape)}"
            )
    in_features, out_features = x.shape[-1], weight.shape[0]
    count, r = lora_A.shape[:2]
    if in_features == 0:
        raise ValueError(
            f"multi_lora_linear: x has 0 input features (shape {tuple(x.shape)}); in_features must be >= 1"
        )
    if weight.shape[1] != in_features:
        raise ValueError(
            f"multi_lora_linear: x has {in_features} input features (shape {tuple(x.shape)}) but weight expects "
            f"{weight.shape[1]} (weight shape {tuple(weight.shape)} = [out_features, in_features])"
        )
    if count == 0 or r == 0:
        raise ValueError(f"multi_lora_linear: lora_A has shape {tuple(lora_A.shape)}; it needs at least one adapter "
                         "and rank r >= 1")
    expected = {"lora_A": (count, r, in_features), "lora_B": (count, out_features, r)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"multi_lora_linear: {name} must have shape {shape}, got {tuple(named[name].shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"multi_lora_linear: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"multi_lora_linear: {name} has dtype {t.dtype} but x has {x.dtype}; all floating-point "
                            "tensors must share one dtype")
    for name, t in {**named, "adapter_index": adapter_index}.items():
        if t.device != x.device:
            raise ValueError(f"multi_lora_linear: {name} is on {t.device} but x is on {x.device}; all tensors must be "
                             "on one device")
    if adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"multi_lora_linear: adapter_index must be an int32 or int64 tensor (-1: no adapter), got "
                        f"dtype {adapter_index.dtype}")
    rows = math.prod(x.shape[:-1])
    if tuple(adapter_index.shape) not in (tuple(x.shape[:-1]), (rows,)):
        raise ValueError(f"multi_lora_linear: adapter_index must have x's leading shape {tuple(x.shape[:-1])} or "
                         f"({rows},), one adapter per row, got shape {tuple(adapter_index.shape)}")
    scalings = _per_adapter("scaling", scaling, count)
    rates = _per_adapter("dropout_p", dropout_p, count)
    if not all(0.0 <= p < 1.0 for p in rates):
        raise ValueError(f"multi_lora_linear: each dropout_p must be in [0, 1), got {rates}")
    return scalings, rates


def multi_lora_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], adapter_index: Tensor, lora_A: Tensor, lora_B: Tensor,
    scaling: PerAdapter, dropout_p: PerAdapter = 0.0, *, backend: Optional[str] = None,
) -> Tensor:
    """y = x·Wᵀ + b + s[a]·(dropout_a(x)·A[a]ᵀ)·B[a]ᵀ with a = adapter_index per row (-1: none).

    scaling, dropout_p: a number for every adapter or one per adapter (host numbers).
    backend: "torch", "cpu", "triton", "cuda", "auto" (the fastest for this shape, measured once:
    lowrank.autotune), or None (LOWRANK_BACKEND, else "auto"). Pass dropout_p=0 at inference.
    """
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    scalings, rates = _check_inputs(x, weight, bias, adapter_index, lora_A, lora_B, scaling, dropout_p)
    backend = _backends.resolve(backend, x.device, "multi_lora_linear")
    lead_shape, x2d = x.shape[:-1], x.reshape(-1, x.shape[-1])
    seed = torch.randint(0, 2**31 - 1, (), device=x.device) if any(p > 0.0 for p in rates) else None
    y, _ = _multi_lora_linear_op(x2d, weight, bias, adapter_index.reshape(-1), lora_A, lora_B, scalings, rates, seed,
                                 backend)
    return y.reshape(*lead_shape, weight.shape[0])
