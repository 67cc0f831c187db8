"""The AVX-512 skinny-GEMM path of the CPU kernels (csrc/cpu/skinny_gemm.cpp).

For fp32 without dropout, on CPUs with AVX-512, the native CPU ops compute x·Aᵀ, dy·B,
dA, dB and the merged weight W + s·B·A with their own micro-kernels. These tests call the
ops directly with fp32 inputs at shapes that reach every block and tail of those kernels,
and compare against the torch backend's math in float64.
"""

from pathlib import Path

import pytest
import torch

import lowrank
from lowrank.ops.lora_linear import _torch_backward, _torch_forward

AVAILABLE = lowrank.backends()


def _has_avx512f():
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and " avx512f" in cpuinfo.read_text()


pytestmark = pytest.mark.skipif(not AVAILABLE["cpu"].available, reason=AVAILABLE["cpu"].reason)
needs_avx512 = pytest.mark.skipif(not _has_avx512f(), reason="the skinny kernels need AVX-512F")

# (M, K, N, r). Row blocks are 12/6/3/1 rows (x·Aᵀ, dy·B) and 4/2/1 rows (merge); rank
# strips are 16/8/4/2/1 rows (dA, dB) and 16..64 lanes (x·Aᵀ, dy·B); columns are tiles of
# 16..64 plus a masked tail. The forward merges when M > K, the backward when M > N.
SHAPES = [
    (0, 8, 6, 4),
    (1, 5, 7, 3),
    (37, 70, 45, 16),
    (97, 33, 129, 1),
    (200, 70, 45, 17),
    (150, 129, 64, 64),
    (130, 100, 20, 100),
    (61, 16, 16, 3),
]
SCALING = 0.7
TOL = 2e-5


def _rand(*shape, gen):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) / max(shape[-1], 1) ** 0.5).float()


def _inputs(M, K, N, r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": _rand(M, K, gen=gen),
        "weight": _rand(N, K, gen=gen),
        "bias": _rand(N, gen=gen),
        "lora_A": _rand(r, K, gen=gen),
        "lora_B": _rand(N, r, gen=gen),
        "grad_y": _rand(M, N, gen=gen),
    }


def _row_strided(t, pad=3):
    """t's values in a view whose rows are `pad` elements longer than t's (unit column stride)."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _assert_close(ours, ref):
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(ours.double(), ref, rtol=TOL, atol=TOL * scale)


def _native_forward(t):
    return torch.ops.lowrank.lora_linear_forward_native(
        t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, 0.0, None
    )


def _native_backward(t, xa, needs_dx=True, needs_dweight=True, needs_dbias=True):
    return torch.ops.lowrank.lora_linear_backward_native(
        t["grad_y"], t["x"], xa, t["weight"], t["lora_A"], t["lora_B"], SCALING, 0.0, None,
        needs_dx, needs_dweight, needs_dbias,
    )


def _check_against_float64(t):
    d = {k: v.double() for k, v in t.items()}
    y, xa = _native_forward(t)
    y_ref, xa_ref = _torch_forward(d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], SCALING, 0.0, None)
    _assert_close(y, y_ref)
    _assert_close(xa, xa_ref)
    # Backward from the float64 xa, so that only the backward's own rounding is measured.
    grads = _native_backward(t, xa_ref.float())
    grads_ref = _torch_backward(
        d["grad_y"], d["x"], xa_ref, d["weight"], d["lora_A"], d["lora_B"], SCALING, 0.0, None, True, True, True
    )
    for g, g_ref in zip(grads, grads_ref):
        _assert_close(g, g_ref)


@pytest.mark.parametrize("M,K,N,r", SHAPES)
def test_matches_float64(M, K, N, r):
    _check_against_float64(_inputs(M, K, N, r))


@pytest.mark.parametrize("M,K,N,r", [(37, 70, 45, 16), (200, 70, 45, 17), (130, 100, 20, 100)])
def test_row_strided_inputs(M, K, N, r):
    t = _inputs(M, K, N, r, seed=1)
    for name in ("x", "weight", "grad_y", "lora_A", "lora_B"):
        t[name] = _row_strided(t[name])
    _check_against_float64(t)


@pytest.mark.parametrize("needs_dx", [True, False])
def test_gradient_subsets(needs_dx):
    t = _inputs(200, 70, 45, 17, seed=2)
    d = {k: v.double() for k, v in t.items()}
    xa = _torch_forward(d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], SCALING, 0.0, None)[1]
    dx, dW, db, dA, dB = _native_backward(t, xa.float(), needs_dx=needs_dx, needs_dweight=False, needs_dbias=False)
    ref = _torch_backward(d["grad_y"], d["x"], xa, d["weight"], d["lora_A"], d["lora_B"], SCALING, 0.0, None,
                          True, False, False)
    assert dW.numel() == 0 and db.numel() == 0
    if needs_dx:
        _assert_close(dx, ref[0])
    else:
        assert dx.numel() == 0
    _assert_close(dA, ref[3])
    _assert_close(dB, ref[4])


def _gemm_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name in ("aten::mm", "aten::addmm", "aten::addmm_") for e in prof.events())


@needs_avx512
@pytest.mark.parametrize("M,K,N,r", [(200, 70, 45, 17), (37, 70, 45, 16)])
def test_fast_path_is_taken(M, K, N, r):
    """fp32 leaves MKL only the big GEMMs: x·W'ᵀ (+ b) and dy·W'; float64 keeps the MKL path."""
    t = _inputs(M, K, N, r)
    merged = M > K and M > N
    expected_forward = 1 if merged else 2  # unmerged: y += s·xa·Bᵀ stays on MKL
    expected_backward = 1 if merged else 2  # unmerged: dx += s·dyB·A stays on MKL
    xa = _native_forward(t)[1]
    assert _gemm_calls(lambda: _native_forward(t)) == expected_forward
    assert _gemm_calls(lambda: _native_backward(t, xa, needs_dweight=False, needs_dbias=False)) == expected_backward
    t64 = {k: v.double() for k, v in t.items()}
    assert _gemm_calls(lambda: _native_forward(t64)) > expected_forward
    xa64 = _native_forward(t64)[1]
    assert _gemm_calls(lambda: _native_backward(t64, xa64, needs_dweight=False, needs_dbias=False)) > expected_backward


def test_column_strided_activations():
    """x and dy without unit column stride take MKL for the rank-r products (the merge still runs here)."""
    t = _inputs(97, 33, 45, 5, seed=3)
    t["x"] = t["x"].t().contiguous().t()
    t["grad_y"] = t["grad_y"].t().contiguous().t()
    _check_against_float64(t)
