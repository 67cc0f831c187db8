"""Triton-specific risks of the dora_linear kernels: strides, block edges, the column sums' row
slices and in-kernel recompute, the dropout mask, unwritten outputs (torch.empty poisoned with
NaN). Cross-backend agreement lives in test_dora_linear.py. Without a GPU the kernels run in
Triton's interpreter (conftest)."""

import pytest
import torch

pytest.importorskip("triton")

from lowrank.kernels import dora_linear as triton_dora  # noqa: E402
from lowrank.ops import dora_magnitude, hash_dropout, weight_row_norm_sq  # noqa: E402
from lowrank.ops.dora_linear import _torch_backward, _torch_forward, column_scale  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-9, atol=1e-9)
NAMES = ("dx", "dW", "db", "dA", "dB", "dm")


def _inputs(M, K, N, r, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)

    x, weight, bias = rand(M, K), rand(N, K, scale=K**-0.5), rand(N)
    lora_A, lora_B = rand(r, K, scale=K**-0.5), rand(N, r, scale=r**-0.5)
    magnitude = dora_magnitude(weight, lora_A, lora_B, 0.5) * (1.0 + rand(N, scale=0.1))
    return x, weight, bias, lora_A, lora_B, magnitude


def _run_both(inputs, p, dy, needs=(True, True, True)):
    """Forward and backward through the Triton and the torch backends: (ours, theirs)."""
    x, weight, bias, lora_A, lora_B, magnitude = inputs
    seed = torch.tensor(1234, dtype=torch.int64, device=DEVICE) if p else None
    norm_sq = weight_row_norm_sq(weight)
    results = []
    for backend in (triton_dora, None):
        forward = _torch_forward if backend is None else backend.forward
        backward = _torch_backward if backend is None else backend.backward
        y, xa, norm, z = forward(x, weight, bias, lora_A, lora_B, magnitude, norm_sq, 0.5, p, seed)
        grads = backward(dy, x, xa, z if p else y, weight, bias, lora_A, lora_B, magnitude, norm, 0.5, p, seed, *needs)
        results.append((y, norm, grads))
    return results


def _assert_same(ours, theirs):
    (y, norm, grads), (y_ref, norm_ref, grads_ref) = ours, theirs
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(norm, norm_ref, **TOL)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        if g_ref is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_strided_inputs(strided_layout, p, poisoned_empty):
    M, K, N, r = 37, 70, 45, 5
    x, weight, bias, lora_A, lora_B, magnitude = _inputs(M, K, N, r)
    dy = torch.randn(M, N, dtype=torch.float64, device=DEVICE)
    x, weight, bias, lora_A, lora_B, dy = strided_layout(x, weight, bias, lora_A, lora_B, dy)
    ours, theirs = _run_both((x, weight, bias, lora_A, lora_B, magnitude), p, dy)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("needs", [(False, False, False), (True, False, True), (False, True, False)])
def test_skipped_gradients_and_no_bias(needs, poisoned_empty):
    x, weight, _, lora_A, lora_B, magnitude = _inputs(33, 40, 20, 4)
    dy = torch.randn(33, 20, dtype=torch.float64, device=DEVICE)
    for p in (0.0, 0.3):
        ours, theirs = _run_both((x, weight, None, lora_A, lora_B, magnitude), p, dy, needs)
        _assert_same(ours, theirs)


@pytest.mark.parametrize("bias", [True, False])
def test_column_sums_recompute_zero_columns_across_blocks_and_slices(bias, poisoned_empty):
    """Columns with g = 0 in different column blocks, rows split in several slices (the last one
    partial): the recovered Σ dy⊙(y − b), the recomputed Σ dy⊙z, and Σ dy, against torch."""
    M, K, N, r = 75, 37, 40, 3
    x, weight, b, lora_A, lora_B, magnitude = _inputs(M, K, N, r)
    b = b if bias else None
    magnitude[[0, 17, 39]] = 0.0
    norm = torch.linalg.vector_norm(weight + 0.5 * lora_B @ lora_A, dim=1)
    norm = torch.stack([norm, norm], 1)[:, 0]  # strided: the kernel must not assume unit stride
    scale = torch.stack([column_scale(magnitude, norm)] * 2, 1)[:, 1]
    xa = x @ lora_A.t()
    z = x @ weight.t() + 0.5 * xa @ lora_B.t()
    y = scale * z + (0.0 if b is None else b)
    dy = torch.randn(M, N, dtype=torch.float64, device=DEVICE)
    dots, sums = triton_dora._column_dots(dy, y, b, x, weight, xa, lora_B, 0.5, scale, norm)
    expected = (dy * z).sum(0)
    torch.testing.assert_close(torch.where(scale != 0, dots / scale, dots), expected, **TOL)
    torch.testing.assert_close(sums, dy.sum(0), **TOL)
    dots, _ = triton_dora._column_dots(dy, z, None, x, weight, xa, lora_B, 0.5)  # no recovery: z given
    torch.testing.assert_close(dots, expected, **TOL)


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_add_dropped_is_bit_exact(p):
    """out += D⊙t with t = 1 and out = 0 gives keep_mask / (1 − p) exactly."""
    M, K = 70, 45
    seed = torch.tensor(99, dtype=torch.int64, device=DEVICE)
    out = torch.zeros(M, K, dtype=torch.float64, device=DEVICE)
    triton_dora._add_dropped(out, torch.ones(M, K, dtype=torch.float64, device=DEVICE), seed, p)
    assert torch.equal(out, hash_dropout.keep_mask(seed, M, K, p).to(torch.float64) / (1.0 - p))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_empty_batch(p, monkeypatch):
    """M = 0: the forward's big kernels and the backward's launch nothing (a launch would fail)."""
    monkeypatch.setattr(triton_dora, "_column_dots_kernel", None)
    monkeypatch.setattr(triton_dora, "_add_dropped_kernel", None)
    x, weight, bias, lora_A, lora_B, magnitude = _inputs(0, 8, 8, 4)
    seed = torch.tensor(3, dtype=torch.int64, device=DEVICE) if p else None
    y, xa, norm, z = triton_dora.forward(x, weight, bias, lora_A, lora_B, magnitude, weight_row_norm_sq(weight), 0.5,
                                         p, seed)
    assert y.shape == (0, 8) and xa.shape == (0, 4) and norm.shape == (8,)
    grads = triton_dora.backward(torch.empty(0, 8, dtype=torch.float64, device=DEVICE), x, xa, z if p else y, weight,
                                 bias, lora_A, lora_B, magnitude, norm, 0.5, p, seed, True, True, True)
    assert grads[0].shape == (0, 8)
    for grad, like in zip(grads[1:], (weight, bias, lora_A, lora_B, magnitude)):
        assert grad.shape == like.shape and not grad.any()
