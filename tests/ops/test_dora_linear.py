"""lowrank.ops.dora_linear: every available backend against the float64 autograd reference, and
the reference against HF PEFT's own DoRA layer."""

import pytest
import torch
from torch import nn

import lowrank
from lowrank.ops import (
    WeightNormCache,
    dora_linear,
    dora_linear_reference,
    dora_magnitude,
    dora_merged_weight,
    dora_unmerged_weight,
    hash_dropout,
    weight_row_norm_sq,
)
from lowrank.ops.dora_linear import column_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}
GRAD_NAMES = ("dx", "dW", "db", "dA", "dB", "dm")


def make_inputs(lead, K, N, r, dtype, bias=True, weight_grad=True, seed=0, zero_magnitudes=()):
    """(x, W, b, A, B, m): B nonzero and m away from the norm, so g ≠ 1 and every term counts;
    the entries of m listed in zero_magnitudes are 0 (g = 0 there)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, requires_grad=True):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) / max(shape[-1], 1) ** 0.5
        return t.to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)

    x, weight = rand(*lead, K), rand(N, K, requires_grad=weight_grad)
    b = rand(N) if bias else None
    A, B = rand(r, K), rand(N, r)
    magnitude = dora_magnitude(weight.detach().double(), A.detach().double(), B.detach().double(), 0.7)
    magnitude = magnitude * (0.5 + torch.rand(N, generator=gen, dtype=torch.float64).to(DEVICE))
    magnitude[list(zero_magnitudes)] = 0.0
    return x, weight, b, A, B, magnitude.to(dtype).requires_grad_()


@pytest.fixture(scope="module")
def reference(reference_check):
    return reference_check(dora_linear, dora_linear_reference, TOLERANCE, GRAD_NAMES)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_float64_matches_reference(backend, linear_shape, dropout_p, reference):
    reference.check(backend, make_inputs(*linear_shape, torch.float64), torch.float64, dropout_p=dropout_p)


@pytest.mark.parametrize("lead,K,N,r", [((70,), 33, 45, 5), ((20,), 64, 48, 16), ((1,), 5, 7, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_float32_matches_reference(backend, lead, K, N, r, bias, reference):
    """fp32 without dropout: the CPU backend's skinny kernels, its merged weight (rows above K or
    N) and its epilogue pass (rows below K); a g = 0 column recomputed in each."""
    inputs = make_inputs(lead, K, N, r, torch.float32, bias=bias, zero_magnitudes=(2,))
    reference.check(backend, inputs, torch.float32)


def _supports(backend, dtype):
    # The Triton interpreter does not model half precision faithfully: those run on the GPU.
    return not (backend == "triton" and DEVICE == "cpu" and dtype in (torch.float16, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_low_precision_matches_reference(backend, dtype, dropout_p, reference):
    if not _supports(backend, dtype):
        pytest.skip("half precision in the Triton interpreter is not faithful; tested on the GPU")
    reference.check(backend, make_inputs((3, 11), 40, 24, 8, dtype), dtype, dropout_p=dropout_p)


def test_frozen_weight_no_bias(backend, reference):
    inputs = make_inputs((9,), 12, 10, 4, torch.float64, bias=False, weight_grad=False)
    reference.check(backend, inputs, torch.float64)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_non_contiguous_inputs(backend, dropout_p, reference):
    def strided(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE)

    x = strided(13, 12)[:, ::2].t()  # [6, 13] with strides (2, 12)
    weight = strided(13, 15).t()  # [15, 13] transposed view: what GPT-2's Conv1D passes
    A = strided(4, 26)[:, ::2]
    B = strided(15, 8)[:, ::2]
    b = strided(30)[::2]
    magnitude = strided(45).abs()[::3]
    inputs = tuple(t.requires_grad_() for t in (x, weight, b, A, B, magnitude))
    assert not any(t.is_contiguous() for t in inputs)
    reference.check(backend, inputs, torch.float64, dropout_p=dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_expanded_grad_output(backend, dropout_p, reference):
    """y.sum().backward() hands the backward a stride-0 gradient."""
    inputs = make_inputs((7,), 9, 11, 3, torch.float64)
    expanded = torch.ones((), dtype=torch.float64, device=DEVICE).expand(7, 11)
    reference.check(backend, inputs, torch.float64, dropout_p=dropout_p, grad_y=expanded)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_zero_scale_columns(backend, dropout_p, reference):
    """g = 0 in three ways: m = 0 (z recomputed for dm), and a row of W + s·B·A that is all zeros
    (n = 0: the column outputs its bias and passes no gradient), beside ordinary columns."""
    x, weight, b, A, B, magnitude = make_inputs((23,), 14, 9, 3, torch.float64, zero_magnitudes=(1, 6))
    with torch.no_grad():
        weight[4] = 0.0
        B[4] = 0.0
    reference.check(backend, (x, weight, b, A, B, magnitude), torch.float64, dropout_p=dropout_p)
    y = dora_linear(x, weight, b, A, B, magnitude, 0.7, backend=backend)
    torch.testing.assert_close(y[:, 4], b[4].expand(23).detach())
    dm = torch.autograd.grad(y, magnitude, torch.randn_like(y))[0]
    assert dm[4] == 0 and dm[1] != 0 and dm[6] != 0


def test_gradcheck(backend):
    """n is a constant by definition, so the op's dW, dA, dB are not the derivatives of its output;
    they are those of G = dora_linear(..., m·n(W, A, B)/n0), with n taken without gradient and n0
    its value at the checked point: as a function G = (m/n0)⊙z + b, its n cancels."""
    x, weight, b, A, B, magnitude = make_inputs((4,), 6, 5, 2, torch.float64)

    def norm_of(weight, A, B):
        with torch.no_grad():
            return torch.linalg.vector_norm(weight + 0.8 * B @ A, dim=1)

    n0 = norm_of(weight, A, B)

    def fn(x, weight, b, A, B, magnitude):
        return dora_linear(x, weight, b, A, B, magnitude * norm_of(weight, A, B) / n0, 0.8, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight, b, A, B, magnitude))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck(backend, dropout_p):
    x, weight, b, A, B, magnitude = make_inputs((5,), 6, 7, 3, torch.float64)
    norm_sq = weight_row_norm_sq(weight)
    seed = torch.tensor(17, device=DEVICE) if dropout_p else None
    torch.library.opcheck(torch.ops.lowrank.dora_linear.default,
                          (x, weight, b, A, B, magnitude, norm_sq, 0.5, dropout_p, seed, backend))
    x, weight, b, A, B, magnitude = (t.detach() for t in (x, weight, b, A, B, magnitude))
    y, xa, norm, z = torch.ops.lowrank.dora_linear(x, weight, b, A, B, magnitude, norm_sq, 0.5, dropout_p, seed,
                                                   backend)
    backward_args = (torch.randn_like(y), x, xa, z if dropout_p else y, weight, b, A, B, magnitude, norm, 0.5,
                     dropout_p, seed)
    torch.library.opcheck(torch.ops.lowrank.dora_linear_backward.default, backward_args + (True, False, True, backend))
    torch.library.opcheck(torch.ops.lowrank.dora_linear_inference.default,
                          (x, weight, b, A, B, magnitude, norm_sq, 0.5, backend))


@pytest.mark.skipif(lowrank._backends.EXTENSION is None, reason="C++ extension not built")
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck_native_ops(dropout_p):
    x, weight, b, A, B, magnitude = (t.detach() for t in make_inputs((5,), 6, 7, 3, torch.float64))
    seed = torch.tensor(3, device=DEVICE)
    forward_args = (x, weight, b, A, B, magnitude, weight_row_norm_sq(weight), 0.5, dropout_p, seed)
    torch.library.opcheck(torch.ops.lowrank.dora_linear_forward_native.default, forward_args)
    y, xa, norm, z = torch.ops.lowrank.dora_linear_forward_native(*forward_args)
    torch.library.opcheck(
        torch.ops.lowrank.dora_linear_backward_native.default,
        (torch.randn_like(y), x, xa, z if dropout_p else y, weight, b, A, B, magnitude, norm, 0.5, dropout_p, seed,
         True, True, False),
    )


@pytest.mark.skipif(lowrank._backends.EXTENSION is None, reason="C++ extension not built")
def test_native_op_names_bad_norm():
    x, weight, b, A, B, magnitude = (t.detach() for t in make_inputs((5,), 6, 7, 3, torch.float64))
    with pytest.raises(RuntimeError, match=r"weight_norm_sq has dtype Float; with x in Double it must be Double"):
        torch.ops.lowrank.dora_linear_forward_native(
            x, weight, b, A, B, magnitude, weight_row_norm_sq(weight).float(), 0.5, 0.0, None)
    y, xa, norm, _ = torch.ops.lowrank.dora_linear_forward_native(
        x, weight, b, A, B, magnitude, weight_row_norm_sq(weight), 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match=r"magnitude must have shape \[N\] = \[7\], got \[6\]"):
        torch.ops.lowrank.dora_linear_backward_native(
            y, x, xa, y, weight, b, A, B, magnitude[:6], norm, 0.5, 0.0, None, True, False, False)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_torch_compile_fullgraph(backend, dropout_p, compiles_like_eager):
    x, weight, b, A, B, magnitude = make_inputs((2, 5), 8, 6, 4, torch.float64)
    cache = WeightNormCache()

    def step(x):
        y = dora_linear(x, weight, b, A, B, magnitude, 0.5, dropout_p, weight_norm_sq=cache(weight), backend=backend)
        return torch.nn.functional.gelu(y).sum()

    compiles_like_eager(step, x, (x, A, B, magnitude))


@pytest.mark.skipif(not lowrank.backends()["cpu"].available or DEVICE != "cpu",
                    reason="needs the cpu backend and CPU tensors")
def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    x, weight, b, A, B, magnitude = make_inputs((4,), 8, 6, 4, torch.float32)

    def layer(x, backend):
        return dora_linear(x, weight, b, A, B, magnitude, 0.5, backend=backend)

    compiled = torch.compile(lambda x: layer(x, "cpu"), fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x, "torch"))


# ---------------------------------------------------------------- inference path


def test_inference_matches_reference(backend, linear_shape, reference):
    x, weight, b, A, B, magnitude = (t.detach() for t in make_inputs(*linear_shape, torch.float64))
    with torch.no_grad():
        y = dora_linear(x, weight, b, A, B, magnitude, 0.7, backend=backend)
    reference.assert_close(y, dora_linear_reference(x, weight, b, A, B, magnitude, 0.7), torch.float64)


def test_inference_runs_the_forward_only_op(monkeypatch):
    import sys

    module = sys.modules["lowrank.ops.dora_linear"]
    calls = []
    for name in ("_dora_linear_op", "_dora_linear_inference_op"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _o=original: calls.append(_n) or _o(*a))
    inputs = make_inputs((3,), 8, 6, 2, torch.float32)
    with torch.no_grad():
        dora_linear(*inputs, 0.5)
    dora_linear(*(t.detach() for t in inputs), 0.5)
    dora_linear(*inputs, 0.5)  # grads needed
    with torch.no_grad():
        dora_linear(*inputs, 0.5, 0.1)  # dropout needs the seed path
    assert calls == ["_dora_linear_inference_op"] * 2 + ["_dora_linear_op"] * 2


# ---------------------------------------------------------------- the norm and its helpers


@pytest.mark.parametrize("K,N,r,scaling", [(70, 45, 16, 0.7), (5, 7, 1, 4.0), (33, 129, 8, 0.05)])
def test_norm_without_materialising_matches_materialised(backend, K, N, r, scaling):
    """The norm the op returns, from ‖W‖², W·Aᵀ and A·Aᵀ, against ‖W + s·B·A‖ formed in float64."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        x, weight, b, A, B, magnitude = (t.detach().to(dtype) for t in make_inputs((3,), K, N, r, torch.float64))
        B *= 3.0  # an adapter term as large as W's
        _, _, norm, _ = torch.ops.lowrank.dora_linear(
            x, weight, b, A, B, magnitude, weight_row_norm_sq(weight), scaling, 0.0, None, backend)
        expected = torch.linalg.vector_norm(weight.double() + scaling * B.double() @ A.double(), dim=1)
        assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(norm.double(), expected, rtol=tol, atol=0)
        torch.testing.assert_close(dora_magnitude(weight, A, B, scaling).double(), expected, rtol=tol, atol=0)


def test_norm_clamps_rounding_below_zero():
    """n² below zero (rounding; here a ‖W‖² passed too small) is clamped: n = 0, not NaN."""
    A = torch.eye(2, dtype=torch.float64)
    B = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    weight_times_a = torch.tensor([[-1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)  # n² = 0 − 2 + 1, 0 + 0 + 1
    norm = column_norm(torch.zeros(2, dtype=torch.float64), weight_times_a, A, B, 1.0)
    assert norm.tolist() == [0.0, 1.0]


def test_op_with_clamped_norm_outputs_bias(backend):
    """With ‖W‖² passed as 0, A·Aᵀ = I and B = −W·Aᵀ/s, n² = −‖W·Aᵀ‖²_row < 0: clamped, n = 0,
    g = 0, and every column outputs its bias."""
    x, weight, b, _, _, magnitude = (t.detach() for t in make_inputs((6,), 8, 5, 2, torch.float64))
    A = torch.eye(2, 8, dtype=torch.float64, device=DEVICE)
    B = -weight @ A.t() / 0.7
    zero = torch.zeros(5, dtype=torch.float64, device=DEVICE)
    y = dora_linear(x, weight, b, A, B, magnitude, 0.7, weight_norm_sq=zero, backend=backend)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, b.expand_as(y))


def test_merged_weight_gives_the_op_and_unmerges_exactly():
    x, weight, b, A, B, magnitude = (t.detach() for t in make_inputs((9,), 12, 10, 4, torch.float64))
    merged, scale = dora_merged_weight(weight, A, B, magnitude, 0.7)
    torch.testing.assert_close(torch.nn.functional.linear(x, merged, b),
                               dora_linear(x, weight, b, A, B, magnitude, 0.7), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dora_unmerged_weight(merged, A, B, scale, 0.7), weight, rtol=1e-12, atol=1e-12)
    magnitude[3] = 0.0
    merged, scale = dora_merged_weight(weight, A, B, magnitude, 0.7)
    with pytest.raises(ValueError, match=r"scale is 0 in rows \[3\]"):
        dora_unmerged_weight(merged, A, B, scale, 0.7)


def test_weight_norm_cache_follows_the_weight():
    weight = torch.randn(6, 4, dtype=torch.float64)
    cache = WeightNormCache()
    first = cache(weight)
    assert cache(weight) is first
    torch.testing.assert_close(first, (weight**2).sum(1))
    with torch.no_grad():
        weight.mul_(2.0)  # in place, as a merge: the version counter moves
    torch.testing.assert_close(cache(weight), (weight**2).sum(1))
    other = weight.clone()
    assert cache(other) is not cache(weight)
    param = nn.Parameter(torch.randn(4, 6))  # GPT-2 Conv1D: the op gets param.t()
    value = cache(param.t())
    assert cache(param.t()) is value
    torch.testing.assert_close(value, (param.detach().t() ** 2).sum(1))


def test_output_changed_in_place_is_refused():
    """z is recovered from the saved output: changing it in place must fail loudly."""
    inputs = make_inputs((4,), 6, 5, 2, torch.float64)
    y = dora_linear(*inputs, 0.5, backend="torch")
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---------------------------------------------------------------- against HF PEFT


class _Proj(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


class _HashDropout(nn.Module):
    """nn.Dropout's place in PEFT's layer, drawing lowrank's hash mask from a fixed seed."""

    def __init__(self, seed, p):
        super().__init__()
        self.seed, self.p = seed, p

    def forward(self, x):
        return hash_dropout.apply(x.reshape(-1, x.shape[-1]), self.seed, self.p).reshape(x.shape)


@pytest.mark.parametrize("layer", ["linear", "conv1d"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_peft_dora_layer(backend, layer, dropout_p):
    """PEFT 0.21's LoraModel with use_dora=True on a one-layer module (nn.Linear, or GPT-2's Conv1D
    whose weight is [in, out]), its weights copied into the op's arguments: output and the
    gradients of x, A, B and m agree; with dropout, PEFT's nn.Dropout draws lowrank's hash mask."""
    peft = pytest.importorskip("peft")
    K, N, r, alpha = 12, 10, 4, 8
    torch.manual_seed(0)
    if layer == "linear":
        base = nn.Linear(K, N)
    else:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(N, K)
        nn.init.normal_(base.bias)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_dora=True, lora_dropout=dropout_p,
                             fan_in_fan_out=layer == "conv1d")
    model = peft.tuners.lora.LoraModel(_Proj(base).double().to(DEVICE), config, "default")
    dora = model.model.proj
    lora_A, lora_B = dora.lora_A["default"].weight, dora.lora_B["default"].weight
    magnitude = dora.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        lora_B.normal_()  # PEFT starts B at 0 and m at ‖W‖: move both, so that g ≠ 1
        magnitude.mul_(torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5)
        magnitude[3] = 0.0
    torch.manual_seed(5)
    seed = torch.randint(0, 2**31 - 1, (), device=DEVICE)  # what dora_linear draws after the same manual_seed
    if dropout_p:
        dora.lora_dropout["default"] = _HashDropout(seed, dropout_p)
    model.train()

    x = torch.randn(2, 7, K, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y_peft = model(x)
    grad_y = torch.randn_like(y_peft)
    peft_grads = torch.autograd.grad(y_peft, (x, lora_A, lora_B, magnitude), grad_y)

    weight = base.weight.detach() if layer == "linear" else base.weight.detach().t()
    ours = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B, magnitude)]
    torch.manual_seed(5)
    y = dora_linear(ours[0], weight, base.bias.detach(), *ours[1:], alpha / r, dropout_p, backend=backend)
    torch.testing.assert_close(y, y_peft, rtol=1e-10, atol=1e-10)
    for name, g, g_peft in zip(("dx", "dA", "dB", "dm"), torch.autograd.grad(y, ours, grad_y), peft_grads):
        torch.testing.assert_close(g, g_peft, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")

    # PEFT's merge: the merged weight is ours
    merged, _ = dora_merged_weight(weight, lora_A.detach(), lora_B.detach(), magnitude.detach(), alpha / r)
    dora.merge()
    peft_merged = dora.base_layer.weight.detach()
    torch.testing.assert_close(merged, peft_merged if layer == "linear" else peft_merged.t(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- dispatch and bad input


def test_autocast_bf16_runs_in_autocast_dtype(backend, reference):
    if not _supports(backend, torch.bfloat16):
        pytest.skip("bf16 in the Triton interpreter is not faithful; tested on the GPU")
    inputs = make_inputs((4, 5), 24, 16, 4, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = dora_linear(*inputs, 0.5, backend=backend)
    assert y.dtype == torch.bfloat16
    grad_y = torch.randn_like(y, dtype=torch.float64)
    grads = torch.autograd.grad(y, inputs, grad_y.to(y.dtype))
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = dora_linear_reference(*ref_inputs, 0.5)
    reference.assert_close(y, y_ref, torch.bfloat16, "y")
    for name, g, g_ref in zip(GRAD_NAMES, grads, torch.autograd.grad(y_ref, ref_inputs, grad_y)):
        assert g.dtype == torch.float32, name  # autocast's cast hands the gradient back in fp32
        reference.assert_close(g, g_ref, torch.bfloat16, name)


def test_unavailable_backend_is_refused():
    inputs = make_inputs((2,), 4, 3, 2, torch.float32)
    if not lowrank.backends()["cuda"].available:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            dora_linear(*inputs, 1.0, backend="cuda")


# The checks dora_linear shares with lora_linear (check_lora_inputs) are tested case by case in
# test_lora_linear.py; here one of them shows they run, named for dora_linear.
@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda t: {**t, "x": t["x"][:, :3]}, ValueError, r"dora_linear: x has 3 input features .* weight expects 4"),
        (lambda t: {**t, "m": t["m"][:2]}, ValueError, r"magnitude must have shape \(3,\)"),
        (lambda t: {**t, "m": t["m"][None]}, ValueError, r"magnitude must have shape \(3,\)"),
        (lambda t: {**t, "m": t["m"].double()}, TypeError, r"magnitude has dtype torch.float64 but x has"),
        (lambda t: {**t, "m": [1.0, 2.0, 3.0]}, TypeError, r"magnitude must be a torch.Tensor, got list"),
        (lambda t: {**t, "norm_sq": t["norm_sq"][:2]}, ValueError, r"weight_norm_sq must have shape \(3,\)"),
        (lambda t: {**t, "norm_sq": t["norm_sq"].to("meta")}, ValueError, r"weight_norm_sq is on meta but x is on cpu"),
        (lambda t: {**t, "norm_sq": t["norm_sq"].long()}, TypeError, r"weight_norm_sq must be floating-point"),
        (lambda t: {**t, "norm_sq": t["norm_sq"].tolist()}, TypeError, r"weight_norm_sq must be a torch.Tensor"),
        (lambda t: {**t, "backend": "nope"}, ValueError, r"dora_linear: backend must be None, 'auto' or one of"),
    ],
)
def test_bad_input_is_named(mutate, error, message):
    x, weight, b, A, B, m = (t.detach().cpu() for t in make_inputs((2,), 4, 3, 2, torch.float32))
    t = mutate({"x": x, "weight": weight, "b": b, "A": A, "B": B, "m": m, "norm_sq": weight_row_norm_sq(weight),
                "p": 0.0, "s": 0.5, "backend": "torch"})
    with pytest.raises(error, match=message):
        dora_linear(t["x"], t["weight"], t["b"], t["A"], t["B"], t["m"], t["s"], t["p"], weight_norm_sq=t["norm_sq"],
                    backend=t["backend"])


# Rows below and above K and N: the cpu backend scales the columns in a pass of its own, or merges
# g and the update into the weight.
@pytest.mark.parametrize("lead,K,N,r", [((6,), 9, 7, 3), ((40,), 9, 7, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("poisoned", ["lora_A", "lora_B"])
def test_nan_propagates_at_zero_scaling(backend, lead, K, N, r, dtype, dropout_p, poisoned, reference):
    """At s=0 the norm ‖W + s·B·A‖ and s·(x·Aᵀ)·Bᵀ are NaN where A or B holds a NaN: every backend
    must say so where the reference does (a GEMM with alpha or beta s would skip the operand)."""
    inputs = make_inputs(lead, K, N, r, dtype)
    with torch.no_grad():
        inputs[3 if poisoned == "lora_A" else 4][1, 2] = float("nan")
    (y, grads), (y_ref, grads_ref) = reference.run(backend, inputs, scaling=0.0, dropout_p=dropout_p)
    assert y_ref.isnan().any()
    for name, ours, ref in zip(("y", *GRAD_NAMES), (y, *grads), (y_ref, *grads_ref)):
        assert torch.equal(ours.isnan(), ref.isnan()), name
    if dropout_p == 0.0:
        with torch.no_grad():  # the forward-only op
            assert torch.equal(dora_linear(*inputs, 0.0, backend=backend).isnan(), y_ref.isnan())


# ---------------------------------------------------------------- GPU: larger shapes, half precision


GPU_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 16), (127, 1000, 3001, 8), (2049, 129, 65, 3), (0, 64, 64, 16)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_against_float64(backend, dtype, M, K, N, r, dropout_p, poison_cuda, reference):
    if backend not in ("triton", "cuda"):
        pytest.skip("the GPU fast paths")
    inputs = make_inputs((M,), K, N, r, dtype, zero_magnitudes=(5,))
    poison_cuda()
    (y, grads), (y_ref, grads_ref) = reference.run(backend, inputs, dropout_p=dropout_p)
    for name, ours, ref in zip(("y", *GRAD_NAMES), (y, *grads), (y_ref, *grads_ref)):
        assert not ours.isnan().any(), f"{name}: unwritten (NaN-poisoned) elements"
        error = ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item() if ref.numel() else 0.0
        assert error < GPU_TOLERANCE[dtype], f"{name}: error {error:.3g}"
