"""Triton-specific risks of the lora_linear kernels: strides, block edges, padding of r,
the in-kernel dropout hash, unwritten outputs. Cross-backend agreement lives in
test_lora_linear.py. Without a GPU the kernels run in Triton's interpreter (conftest)."""

import pytest
import torch

pytest.importorskip("triton")

from lowrank import _backends  # noqa: E402
from lowrank.kernels import (
    lora_linear as triton_lora,  # noqa: E402
    matmul as triton_matmul,  # noqa: E402
)
from lowrank.ops import hash_dropout, lora_linear, lora_linear_reference  # noqa: E402
from lowrank.ops.lora_linear import _torch_backward, _torch_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = _backends.triton_interpret()
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}

# (M, K, N, r): tiny, several blocks with ragged edges, r=1, r above one rank chunk.
SHAPES = [(1, 5, 7, 3), (37, 70, 45, 16), (65, 33, 129, 1), (40, 50, 36, 37)]


def _inputs(M, K, N, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)

    x = rand(M, K)
    weight = rand(N, K, scale=K**-0.5)
    bias = rand(N)
    lora_A = rand(r, K, scale=K**-0.5)
    lora_B = rand(N, r, scale=r**-0.5)
    return x, weight, bias, lora_A, lora_B


def _seed(p, value=1234):
    return torch.tensor(value, dtype=torch.int64, device=DEVICE) if p > 0 else None


def _assert_grads_close(got, want, **tol):
    names = ("dx", "dW", "db", "dA", "dB")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_op_matches_reference(shape, dtype, p):
    """Forward and all five gradients through the custom op and its autograd."""
    args = [t.requires_grad_() for t in _inputs(*shape, dtype)]
    seed = _seed(p)
    y, _ = torch.ops.lowrank.lora_linear(*args, 0.5, p, seed, "triton")
    y_ref = lora_linear_reference(*args, 0.5, p, seed)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, args, dy)
    want = torch.autograd.grad(y_ref, args, dy)
    _assert_grads_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_strided_inputs(strided_layout, p, poisoned_empty):
    M, K, N, r = 37, 70, 45, 5
    x, weight, bias, lora_A, lora_B = _inputs(M, K, N, r, torch.float64)
    dy = torch.randn(M, N, dtype=torch.float64, device=DEVICE)
    x, weight, bias, lora_A, lora_B, dy = strided_layout(x, weight, bias, lora_A, lora_B, dy)

    seed = _seed(p)
    hyper = (0.5, p, seed)
    y, xa = triton_lora.forward(x, weight, bias, lora_A, lora_B, *hyper)
    y_ref, xa_ref = _torch_forward(x, weight, bias, lora_A, lora_B, *hyper)
    torch.testing.assert_close(xa, xa_ref, **TOL[torch.float64])
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    got = triton_lora.backward(dy, x, xa, weight, lora_A, lora_B, *hyper, True, True, True)
    want = _torch_backward(dy, x, xa_ref, weight, lora_A, lora_B, *hyper, True, True, True)
    _assert_grads_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("needs", [(False, False, False), (True, False, True), (False, True, False)])
def test_skipped_gradients_and_no_bias(needs, poisoned_empty):
    x, weight, _, lora_A, lora_B = _inputs(33, 40, 20, 4, torch.float64)
    hyper = (2.0, 0.3, _seed(0.3))
    y, xa = triton_lora.forward(x, weight, None, lora_A, lora_B, *hyper)
    y_ref, xa_ref = _torch_forward(x, weight, None, lora_A, lora_B, *hyper)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    dy = torch.randn_like(y)
    got = triton_lora.backward(dy, x, xa, weight, lora_A, lora_B, *hyper, *needs)
    want = _torch_backward(dy, x, xa_ref, weight, lora_A, lora_B, *hyper, *needs)
    _assert_grads_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_empty_batch_launches_nothing(p, monkeypatch):
    # A launch would index these and fail.
    monkeypatch.setattr(triton_matmul, "matmul_kernel", None)
    monkeypatch.setattr(triton_lora, "_lora_matmul_kernel", None)
    x, weight, bias, lora_A, lora_B = _inputs(0, 8, 8, 4, torch.float32)
    hyper = (0.5, p, _seed(p))
    y, xa = triton_lora.forward(x, weight, bias, lora_A, lora_B, *hyper)
    assert y.shape == (0, 8) and xa.shape == (0, 4)
    dx, dW, db, dA, dB = triton_lora.backward(
        torch.empty(0, 8, device=DEVICE), x, xa, weight, lora_A, lora_B, *hyper, True, True, True
    )
    assert dx.shape == (0, 8)
    for grad, like in ((dW, weight), (db, bias), (dA, lora_A), (dB, lora_B)):
        assert grad.shape == like.shape and grad.dtype == like.dtype and not grad.any()


def test_three_dim_input_through_public_api():
    x, weight, bias, lora_A, lora_B = _inputs(2 * 19, 24, 30, 8, torch.float64)
    args = [x.reshape(2, 19, 24), weight, bias, lora_A, lora_B]
    args = [t.requires_grad_() for t in args]
    y = lora_linear(*args, 0.25, backend="triton")
    y_ref = lora_linear_reference(*args, 0.25)
    assert y.shape == (2, 19, 30)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    got = torch.autograd.grad(y.sum(), args)  # the expanded grad_y travels through the op
    want = torch.autograd.grad(y_ref.sum(), args)
    _assert_grads_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("seed_value", [0, 2**31 - 2])
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_dropout_mask_is_bit_exact(p, seed_value):
    """Inputs chosen so xa, dx and dA each equal keep_mask / (1 - p) exactly, one per kernel path:
    mask on the a operand (xa), on the b operand (dA), on the output tile (dx)."""
    M, K = 70, 45
    f64 = dict(dtype=torch.float64, device=DEVICE)
    seed = _seed(p, seed_value)
    expected = hash_dropout.keep_mask(seed, M, K, p).to(torch.float64) / (1.0 - p)
    ones = torch.ones(M, K, **f64)

    # xa = D⊙x·Aᵀ with x = 1, A = I
    _, xa = triton_lora.forward(
        ones, torch.zeros(3, K, **f64), None, torch.eye(K, **f64), torch.zeros(3, K, **f64), 1.0, p, seed
    )
    assert torch.equal(xa, expected)

    # dyB = dy·B = I, so dA = D⊙x = D and dx = 0·W + D⊙(I·1) = D
    eye = torch.eye(M, **f64)
    dx, _, _, dA, _ = triton_lora.backward(
        eye, ones, torch.zeros(M, M, **f64), torch.zeros(M, K, **f64), ones[:M], eye, 1.0, p, seed, True, False, False
    )
    assert torch.equal(dA, expected)
    assert torch.equal(dx, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_float64(dtype):
    if dtype == torch.bfloat16 and INTERPRET:
        pytest.skip("triton 3.6's interpreter computes bf16 tl.dot on raw bits (see test_bf16_rejected_in_interpreter)")
    M, K, N, r = 45, 70, 40, 8
    args = _inputs(M, K, N, r, dtype)
    seed = _seed(0.3)
    y, xa = triton_lora.forward(*args, 0.5, 0.3, seed)
    assert y.dtype == xa.dtype == dtype
    y_ref = lora_linear_reference(*(t.double() for t in args), 0.5, 0.3, seed)
    torch.testing.assert_close(y.double(), y_ref, rtol=3e-2, atol=3e-2)
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    got = triton_lora.backward(dy, args[0], xa, args[1], args[3], args[4], 0.5, 0.3, seed, True, True, True)
    want = _torch_backward(
        dy.double(), args[0].double(), xa.double(), args[1].double(), args[3].double(), args[4].double(),
        0.5, 0.3, seed, True, True, True,
    )
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(not INTERPRET, reason="interpreter-only limitation")
def test_bf16_rejected_in_interpreter():
    args = _inputs(4, 8, 8, 2, torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        triton_lora.forward(*args, 1.0, 0.0, None)


def test_unsupported_dtype_is_a_type_error():
    x, weight, bias, lora_A, lora_B = (t.to(torch.float8_e4m3fn) for t in _inputs(4, 8, 8, 2, torch.float32))
    with pytest.raises(TypeError, match="float8"):
        triton_lora.forward(x, weight, bias, lora_A, lora_B, 1.0, 0.0, None)


def test_tf32_follows_torch_flag():
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert triton_matmul.dot_options(torch.float32)["DOT_PRECISION"] == "ieee"
        matmul.allow_tf32 = True
        assert triton_matmul.dot_options(torch.float32)["DOT_PRECISION"] == "tf32"
        assert triton_matmul.dot_options(torch.float16)["DOT_PRECISION"] == "ieee"
    finally:
        matmul.allow_tf32 = saved


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_opcheck(p):
    x, weight, bias, lora_A, lora_B = (t.requires_grad_() for t in _inputs(40, 36, 33, 4, torch.float64))
    torch.library.opcheck(
        torch.ops.lowrank.lora_linear.default, (x, weight, bias, lora_A, lora_B, 0.5, p, _seed(p), "triton")
    )


def test_gpu_tile_search_space_fits_dtype_shape_and_register_budget():
    """The autotuner's pruning: FMA dtypes keep only small tiles, tiles shrink to padded sizes,
    and a kernel variant holding more live tiles gets a smaller register budget."""
    tuned = triton_lora._lora_matmul_tuned

    def pruned(M, N, K, dtype, precision="ieee", dropout=False):
        args = {"M": M, "N": N, "K": K, "a_ptr": torch.empty(0, dtype=dtype)}
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in
                tuned.early_config_prune(tuned.configs, args, DOT_PRECISION=precision, DROPOUT=dropout)]

    assert (128, 256, 64, 8) in pruned(8192, 4096, 4096, torch.bfloat16)
    assert all(m * n <= 64 * 64 and k <= 32 for m, n, k, _ in pruned(8192, 4096, 4096, torch.float32))
    assert any(m * n > 64 * 64 for m, n, _, _ in pruned(8192, 4096, 4096, torch.float32, "tf32"))
    assert {n for _, n, _, _ in pruned(8192, 16, 4096, torch.float16)} == {16}  # skinny x·Aᵀ
    assert {m for m, _, _, _ in pruned(1, 4096, 4096, torch.float16)} == {16}  # decoding
    assert pruned(8192, 4096, 4096, torch.float64)
    with_dropout = pruned(8192, 4096, 4096, torch.bfloat16, dropout=True)
    assert (128, 128, 64, 8) in with_dropout
    assert all(m * n <= 64 * 32 * warps for m, n, _, warps in with_dropout)


@pytest.mark.parametrize("dropout_on", ["none", "a", "a_transposed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_reduction_matches_reference(dropout_on, dtype, poisoned_empty):
    """A reduction split into slices (the last one partial) sums to the unsplit product, with the
    dropout mask of a, or of the tensor a is the transpose of, applied per element."""
    M, K, N, p, alpha = 40, 150, 5, 0.3, 1.5
    length = triton_matmul.split_length(torch.device(DEVICE), M, N, K)
    assert length < K and K % length, "the shape must split, with a partial last slice"
    g = torch.Generator().manual_seed(3)
    b = torch.randn(K, N, generator=g, dtype=torch.float64)
    seed = _seed(p)
    if dropout_on == "a_transposed":
        dropped = torch.randn(K, M, generator=g, dtype=torch.float64)
        a, a_ref = dropped.t(), (hash_dropout.apply(dropped, seed, p) * (1 - p)).t()
        flag = triton_matmul.DROPOUT_A_TRANSPOSED
    else:
        a = torch.randn(M, K, generator=g, dtype=torch.float64)
        a_ref = hash_dropout.apply(a, seed, p) * (1 - p) if dropout_on == "a" else a
        flag = triton_matmul.DROPOUT_A if dropout_on == "a" else triton_matmul.NO_DROPOUT
    out = torch.empty(N, M, dtype=dtype, device=DEVICE).t()  # a strided output, written in place
    triton_matmul.matmul(a.to(dtype=dtype, device=DEVICE), b.to(dtype=dtype, device=DEVICE), alpha=alpha,
                        dropout_p=p if dropout_on != "none" else 0.0, seed=seed, dropout_on=flag, out=out)
    torch.testing.assert_close(out.double().cpu(), alpha * a_ref @ b, **TOL[dtype])


def test_split_length_fills_hopper_with_the_rank_r_gradients(monkeypatch):
    """At M=8192, K=N=4096, r=16 on a 132-SM GPU, dB [N, r] and dAᵀ [K, r] (32 tiles of 128
    rows each) are reduced over M in 8 slices, 256 programs; the big dW stays unsplit."""
    monkeypatch.setattr(_backends, "triton_interpret", lambda: False)
    monkeypatch.setattr(_backends, "multiprocessor_count", lambda device: 132)
    assert triton_matmul.split_length(torch.device("cuda"), 4096, 16, 8192) == 1024
    assert triton_matmul.split_length(torch.device("cuda"), 4096, 4096, 8192) == 8192
