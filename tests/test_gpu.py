"""GPU checks of the fast paths: triton and cuda against the float64 reference, every gradient,
fp32/fp16/bf16, awkward shapes, with the CUDA caching allocator poisoned with NaN before each
run so that any output element a kernel forgets to write shows up. Skipped without CUDA."""

import pytest
import torch

import lowrank
from lowrank.ops import lora_linear, lora_linear_reference, multi_lora_linear, multi_lora_linear_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

FAST_PATHS = [
    pytest.param(name, marks=pytest.mark.skipif(not status.available, reason=status.reason), id=name)
    for name, status in lowrank.backends().items()
    if name in ("triton", "cuda")
]
# Relative to the largest reference magnitude: fp32 GEMMs may use TF32-free IEEE paths but
# accumulate in a different order; half formats round every stored output.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
# M, K, N, r: one-row decode, block-size-unfriendly, wide r, tall-skinny.
SHAPES = [(1, 4096, 4096, 16), (127, 1000, 3001, 8), (513, 256, 768, 64), (2049, 129, 65, 3), (0, 64, 64, 16)]


def make(M, K, N, r, dtype, gen):
    def rand(*shape):
        t = torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64) / shape[-1] ** 0.5
        return t.to(dtype).requires_grad_()

    return rand(M, K), rand(N, K), rand(N), rand(r, K), rand(N, r)


def relative_error(ours, ref):
    if ref.numel() == 0:
        return 0.0
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def assert_all_close(ours_all, refs, dtype, names=("y", "dx", "dW", "db", "dA", "dB")):
    """Output and gradients against float64: dtype, shape, every element written, error in tolerance."""
    for name, ours, ref in zip(names, ours_all, refs):
        assert ours.dtype == dtype and ours.shape == ref.shape, name
        assert not ours.isnan().any(), f"{name}: unwritten (NaN-poisoned) elements"
        assert relative_error(ours, ref) < TOLERANCE[dtype], f"{name}: error {relative_error(ours, ref):.3g}"


@pytest.mark.parametrize("backend", FAST_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_fast_path_against_float64(backend, dtype, M, K, N, r, dropout_p, poison_cuda):
    gen = torch.Generator(device="cuda").manual_seed(M * 7 + K)
    inputs = make(M, K, N, r, dtype, gen)
    grad_y = torch.randn(M, N, generator=gen, device="cuda", dtype=torch.float64)

    poison_cuda()
    torch.manual_seed(0)
    y = lora_linear(*inputs, 0.5, dropout_p, backend=backend)
    poison_cuda()
    grads = torch.autograd.grad(y, inputs, grad_y.to(dtype))

    torch.manual_seed(0)
    seed = torch.randint(0, 2**31 - 1, (), device="cuda") if dropout_p else None
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = lora_linear_reference(*ref_inputs, 0.5, dropout_p, seed)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad_y)

    assert_all_close((y, *grads), (y_ref, *grads_ref), dtype)


@pytest.mark.parametrize("backend", FAST_PATHS)
def test_fast_path_strided_and_expanded(backend, poison_cuda):
    """A transposed weight view (GPT-2 Conv1D), a strided x and a stride-0 gradient."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(600, 2 * 333, generator=gen, device="cuda", dtype=torch.bfloat16)[:, ::2].requires_grad_()
    w_t = torch.randn(333, 257, generator=gen, device="cuda", dtype=torch.bfloat16).t().requires_grad_()
    A = (torch.randn(16, 333, generator=gen, device="cuda", dtype=torch.bfloat16) / 20).requires_grad_()
    B = (torch.randn(257, 16, generator=gen, device="cuda", dtype=torch.bfloat16) / 4).requires_grad_()
    inputs = (x, w_t, None, A, B)
    poison_cuda()
    y = lora_linear(*inputs, 2.0, backend=backend)
    grads = torch.autograd.grad(y.sum(), (x, w_t, A, B))
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, w_t, A, B)]
    y_ref = lora_linear_reference(ref_inputs[0], ref_inputs[1], None, ref_inputs[2], ref_inputs[3], 2.0)
    grads_ref = torch.autograd.grad(y_ref.sum(), ref_inputs)
    for ours, ref in zip((y, *grads), (y_ref, *grads_ref)):
        assert not ours.isnan().any()
        assert relative_error(ours, ref) < TOLERANCE[torch.bfloat16]


# M, K, N, r, adapters: one-row decode, block-size-unfriendly, many adapters over few rows, empty.
MULTI_SHAPES = [(1, 4096, 4096, 16, 4), (127, 1000, 3001, 8, 3), (2049, 129, 65, 3, 16), (0, 64, 64, 16, 2)]


@pytest.mark.parametrize("backend", FAST_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M,K,N,r,count", MULTI_SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_multi_lora_fast_path_against_float64(backend, dtype, M, K, N, r, count, dropout_p, poison_cuda):
    """Mixed adapters per row, rows without one (-1), the last adapter without rows, per-adapter
    dropout rates (every other adapter at dropout_p)."""
    gen = torch.Generator(device="cuda").manual_seed(M * 7 + K)
    x, weight, bias, _, _ = make(M, K, N, r, dtype, gen)
    A = (torch.randn(count, r, K, generator=gen, device="cuda", dtype=torch.float64) / K**0.5).to(dtype)
    B = (torch.randn(count, N, r, generator=gen, device="cuda", dtype=torch.float64) / r**0.5).to(dtype)
    inputs = (x, weight, bias, A.requires_grad_(), B.requires_grad_())
    index = torch.randint(-1, count - 1, (M,), generator=gen, device="cuda")
    scaling = [0.5 + 0.25 * a for a in range(count)]
    rates = [dropout_p * (a % 2) for a in range(count)]
    grad_y = torch.randn(M, N, generator=gen, device="cuda", dtype=torch.float64)

    poison_cuda()
    torch.manual_seed(0)
    y = multi_lora_linear(*inputs[:3], index, *inputs[3:], scaling, rates, backend=backend)
    poison_cuda()
    grads = torch.autograd.grad(y, inputs, grad_y.to(dtype))

    torch.manual_seed(0)
    seed = torch.randint(0, 2**31 - 1, (), device="cuda") if dropout_p else None
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = multi_lora_linear_reference(*ref_inputs[:3], index, *ref_inputs[3:], scaling, rates, seed)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad_y)

    assert_all_close((y, *grads), (y_ref, *grads_ref), dtype)
