"""lowrank.ops.adapter: every available backend against the float64 autograd reference."""

import pytest
import torch

import lowrank
from lowrank import autotune
from lowrank.ops import adapter, adapter_reference

AVAILABLE = lowrank.backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


ACTIVATIONS = ["relu", "gelu", "silu"]

# (lead shape of h, D, Bn): block-size-unfriendly sizes, M=1, M=0, 3-D inputs, Bn=1, Bn=D,
# and rows spanning several of the CPU kernel's row chunks (2**17 elements of h each).
SHAPES = [
    ((1,), 5, 3),
    ((0,), 8, 4),
    ((37,), 70, 16),
    ((65,), 33, 1),
    ((2, 3), 17, 17),
    ((2, 211), 700, 24),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_inputs(lead, D, Bn, dtype, bias=True, weight_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, requires_grad=True):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) / max(shape[-1], 1) ** 0.5
        return t.to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)

    h = rand(*lead, D) * (D**0.5)  # unit-scale activations, so every activation sees both signs
    h = h.detach().requires_grad_()
    w_down = rand(Bn, D, requires_grad=weight_grad)
    b_down = rand(Bn) if bias else None
    w_up = rand(D, Bn, requires_grad=weight_grad)
    b_up = rand(D) if bias else None
    return h, w_down, b_down, w_up, b_up


def grads_of(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out)


def assert_close(ours, ref, dtype):
    tol = TOLERANCE[dtype]
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * scale)


def check_against_reference(backend, inputs, dtype, activation="relu", scaling=0.7, residual=True, grad_out=None):
    out = adapter(*inputs, activation, scaling, residual, backend=backend)
    ref_inputs = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref = adapter_reference(*ref_inputs, activation, scaling, residual)
    if grad_out is None:
        grad_out = torch.randn_like(ref)
    grads = grads_of(out, inputs, grad_out.to(out.dtype))
    grads_ref = grads_of(ref, ref_inputs, grad_out.double())
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, g_ref, dtype)


@pytest.mark.parametrize("lead, D, Bn", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float64_matches_reference(backend, lead, D, Bn, activation):
    check_against_reference(backend, make_inputs(lead, D, Bn, torch.float64), torch.float64, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_without_residual(backend, activation, bias):
    inputs = make_inputs((2, 19), 40, 12, torch.float64, bias=bias)
    check_against_reference(backend, inputs, torch.float64, activation, scaling=1.3, residual=False)


def test_frozen_weights_no_biases(backend):
    """Only h needs a gradient: the weight gradients are skipped, not computed and dropped."""
    inputs = make_inputs((9,), 12, 4, torch.float64, bias=False, weight_grad=False)
    check_against_reference(backend, inputs, torch.float64, "gelu")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_matches_reference(backend, activation):
    """fp32 takes other GEMM paths than fp64 (oneDNN in the cpu backend); rows span several chunks."""
    check_against_reference(backend, make_inputs((3, 150), 700, 40, torch.float32), torch.float32, activation)


def _supports(backend, dtype):
    # The Triton interpreter computes bf16 tl.dot wrongly; bf16 Triton is checked on GPUs.
    return not (backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(backend, dtype):
    if not _supports(backend, dtype):
        pytest.skip("the Triton interpreter mishandles bf16 tl.dot")
    check_against_reference(backend, make_inputs((3, 11), 40, 24, dtype), dtype, "gelu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_contiguous_inputs(backend, dtype):
    def strided(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    h = strided(13, 20)[:, ::2].t()  # [10, 13] with strides (2, 20)
    w_down = strided(13, 6).t()  # [6, 13] transposed view
    w_up = strided(13, 12)[:, ::2]  # [13, 6] with strides (12, 2)
    b_down, b_up = strided(12)[::2], strided(26)[::2]
    inputs = tuple(t.requires_grad_() for t in (h, w_down, b_down, w_up, b_up))
    assert not any(t.is_contiguous() for t in inputs)
    check_against_reference(backend, inputs, dtype, "silu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expanded_grad_output(backend, dtype):
    """out.sum().backward() hands the backward a stride-0 gradient."""
    inputs = make_inputs((7,), 9, 3, dtype)
    expanded = torch.ones((), dtype=dtype, device=DEVICE).expand(7, 9)
    check_against_reference(backend, inputs, dtype, "gelu", grad_out=expanded)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(backend, activation):
    inputs = make_inputs((4,), 6, 3, torch.float64)

    def fn(*tensors):
        return adapter(*tensors, activation, 0.8, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


def test_backward_saves_only_h_z_and_weights(backend):
    """No [M, D] or second [M, Bn] tensor is kept for backward: act(z) is recomputed."""
    h, w_down, b_down, w_up, b_up = make_inputs((6,), 10, 4, torch.float64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = adapter(h, w_down, b_down, w_up, b_up, "gelu", 0.5, backend=backend)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(6, 10), (6, 4), (4, 10), (10, 4)])
    out.sum().backward()


@pytest.mark.parametrize("residual", [True, False])
def test_opcheck(backend, residual):
    h, w_down, b_down, w_up, b_up = make_inputs((5,), 7, 3, torch.float64)
    torch.library.opcheck(
        torch.ops.lowrank.adapter.default, (h, w_down, b_down, w_up, b_up, "silu", 0.5, residual, backend)
    )
    grad_out = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    z = h.detach() @ w_down.detach().t() + b_down.detach()
    args = (grad_out, h.detach(), z, w_down.detach(), w_up.detach(), "silu", 0.5, residual)
    torch.library.opcheck(torch.ops.lowrank.adapter_backward.default, args + (True, False, True, True, False, backend))


@pytest.mark.skipif(lowrank._backends.EXTENSION is None, reason="C++ extension not built")
@pytest.mark.parametrize("has_bias", [True, False])
def test_opcheck_native_ops(has_bias):
    h, w_down, b_down, w_up, b_up = (
        None if t is None else t.detach() for t in make_inputs((5,), 7, 3, torch.float64, bias=has_bias)
    )
    torch.library.opcheck(
        torch.ops.lowrank.adapter_forward_native.default, (h, w_down, b_down, w_up, b_up, "gelu", 0.5, True)
    )
    grad_out = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    z = h @ w_down.t()
    torch.library.opcheck(
        torch.ops.lowrank.adapter_backward_native.default,
        (grad_out, h, z, w_down, w_up, "gelu", 0.5, False, True, True, False, True, True),
    )


def test_torch_compile_fullgraph(backend, compiles_like_eager):
    h, w_down, b_down, w_up, b_up = make_inputs((2, 5), 8, 4, torch.float64)

    def step(h):
        out = adapter(h, w_down, b_down, w_up, b_up, "gelu", 0.5, backend=backend)
        return torch.tanh(out).sum()

    compiles_like_eager(step, h, (h, w_down, b_down, w_up, b_up))


@pytest.mark.skipif(not AVAILABLE["cpu"].available or DEVICE != "cpu", reason="needs the cpu backend and CPU tensors")
def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    h, w_down, b_down, w_up, b_up = make_inputs((4,), 8, 4, torch.float32)
    compiled = torch.compile(
        lambda h: adapter(h, w_down, b_down, w_up, b_up, "silu", 0.5, backend="cpu"), fullgraph=True
    )
    torch.testing.assert_close(compiled(h), adapter(h, w_down, b_down, w_up, b_up, "silu", 0.5, backend="torch"))


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("poisoned", [3, 4], ids=["w_up", "b_up"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d)[6:])
def test_nan_propagates_at_zero_scaling(backend, residual, poisoned, dtype):
    """s·(act(h·W_dᵀ + b_d)·W_uᵀ + b_u) is NaN where W_u or b_u holds a NaN, also at s=0: every backend
    must say so (a GEMM with alpha=s or beta=s would skip that operand and hide it)."""
    inputs = make_inputs((2, 9), 16, 4, dtype)
    with torch.no_grad():
        inputs[poisoned][3] = float("nan")
    out = adapter(*inputs, "relu", 0.0, residual, backend=backend)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = adapter_reference(*ref_inputs, "relu", 0.0, residual)
    grad_out = torch.randn_like(ref)
    assert ref.isnan().any()
    pairs = zip((out, *grads_of(out, inputs, grad_out.to(dtype))), (ref, *grads_of(ref, ref_inputs, grad_out)))
    for ours, expected in pairs:
        assert torch.equal(ours.isnan(), expected.isnan())


# ---------------------------------------------------------------- dispatch and bad input


def test_auto_backend_measures_and_caches():
    autotune.clear()
    inputs = make_inputs((6,), 16, 4, torch.float32)
    out = adapter(*inputs, "relu", 1.0, backend="auto")
    assert_close(out, adapter_reference(*(t.detach().double() for t in inputs), "relu", 1.0), torch.float32)
    picked = [name for key, name in autotune.choices().items() if key[0] == "adapter"]
    assert len(picked) == 1 and picked[0] in autotune.candidates(torch.device(DEVICE))


def test_autocast_runs_in_autocast_dtype():
    inputs = [t.detach().float() for t in make_inputs((4,), 8, 2, torch.float32)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = adapter(*inputs, "gelu", 0.5, backend="torch")
    assert out.dtype == torch.bfloat16


def _valid():
    return [t.detach() for t in make_inputs((4,), 8, 2, torch.float32)]


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda a: a.__setitem__(0, torch.randn(4, 9)),
            ValueError,
            r"h has dim 9 .* w_down expects 8 .*\[bottleneck, dim\]",
        ),
        (
            lambda a: a.__setitem__(3, torch.randn(8, 3)),
            ValueError,
            r"w_up must have shape \[dim, bottleneck\] = \(8, 2\), got \(8, 3\)",
        ),
        (
            lambda a: a.__setitem__(2, torch.randn(3)),
            ValueError,
            r"b_down must have shape \[bottleneck\] = \(2,\), got \(3,\)",
        ),
        (lambda a: a.__setitem__(4, torch.randn(7)), ValueError, r"b_up must have shape \[dim\] = \(8,\), got \(7,\)"),
        (lambda a: a.__setitem__(1, torch.randn(8, 2)), ValueError, r"h has dim 8 .* w_down expects 2"),
        (lambda a: a.__setitem__(1, torch.randn(9, 8)), ValueError, r"bottleneck 9 is larger than dim 8"),
        (lambda a: a.__setitem__(1, torch.randn(8)), ValueError, r"w_down must be 2-D"),
        (
            lambda a: a.__setitem__(0, torch.ones(4, 8, dtype=torch.int64)),
            TypeError,
            r"h must be a floating-point tensor",
        ),
        (lambda a: a.__setitem__(3, a[3].double()), TypeError, r"w_up has dtype torch.float64 but h has torch.float32"),
        (lambda a: a.__setitem__(4, a[4].to("meta")), ValueError, r"b_up is on meta but h is on cpu"),
    ],
)
def test_bad_input_names_tensor_and_expected_shape(change, error, message):
    args = [t.cpu() for t in _valid()]
    change(args)
    with pytest.raises(error, match=message):
        adapter(*args, "relu", 1.0, backend="torch")


def test_unknown_activation_and_bad_scaling():
    args = _valid()
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'; expected one of \('relu', 'gelu', 'silu'\)"):
        adapter(*args, "tanh", 1.0)
    with pytest.raises(TypeError, match="scaling must be a Python number"):
        adapter(*args, "relu", torch.tensor(1.0))
    with pytest.raises(TypeError, match="h must be a torch.Tensor, got list"):
        adapter(args[0].tolist(), *args[1:], "relu", 1.0)
    with pytest.raises(ValueError, match=r"adapter: backend must be None, 'auto' or one of .*, got 'nope'"):
        adapter(*args, "relu", 1.0, backend="nope")


@pytest.mark.skipif(lowrank._backends.EXTENSION is None, reason="C++ extension not built")
def test_native_ops_check_their_inputs():
    h, w_down, b_down, w_up, b_up = (t.detach().cpu() for t in _valid())
    forward = torch.ops.lowrank.adapter_forward_native
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        forward(h, w_down, b_down, w_up, b_up, "tanh", 1.0, True)
    with pytest.raises(RuntimeError, match=r"w_up must have shape \[D, Bn\] = \[8, 2\], got \[2, 8\]"):
        forward(h, w_down, b_down, w_up.t(), b_up, "relu", 1.0, True)
    with pytest.raises(RuntimeError, match="bottleneck 9 is larger than dim 8"):
        forward(h, torch.randn(9, 8), None, torch.randn(8, 9), None, "relu", 1.0, True)
    with pytest.raises(RuntimeError, match=r"z must have shape \[M, Bn\] = \[4, 2\]"):
        torch.ops.lowrank.adapter_backward_native(
            h, h, h, w_down, w_up, "relu", 1.0, True, True, True, True, True, True
        )


@pytest.mark.skipif(not AVAILABLE["cpu"].available or DEVICE != "cpu", reason="needs the cpu backend and CPU tensors")
def test_cpu_backend_without_onednn():
    """The cpu backend's fp32 GEMMs fall back to MKL when oneDNN is switched off."""
    inputs = make_inputs((3, 150), 700, 40, torch.float32)
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        check_against_reference("cpu", inputs, torch.float32, "gelu")
    finally:
        torch.backends.mkldnn.enabled = enabled
