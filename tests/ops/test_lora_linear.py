"""lowrank.ops.lora_linear: every available backend against the float64 autograd reference."""

import pytest
import torch

import lowrank
from lowrank.ops import hash_dropout, lora_linear, lora_linear_reference

AVAILABLE = lowrank.backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
GRAD_NAMES = ("dx", "dW", "db", "dA", "dB")


def make_inputs(lead, K, N, r, dtype, bias=True, weight_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, requires_grad=True):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) / max(shape[-1], 1) ** 0.5
        return t.to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)

    x = rand(*lead, K)
    weight = rand(N, K, requires_grad=weight_grad)
    b = rand(N) if bias else None
    return x, weight, b, rand(r, K), rand(N, r)


@pytest.fixture(scope="module")
def reference(reference_check):
    return reference_check(lora_linear, lora_linear_reference, TOLERANCE, GRAD_NAMES)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_float64_matches_reference(backend, linear_shape, dropout_p, reference):
    reference.check(backend, make_inputs(*linear_shape, torch.float64), torch.float64, dropout_p=dropout_p)


def _supports(backend, dtype):
    # The Triton interpreter does not model half precision faithfully: those run on the GPU.
    return not (backend == "triton" and DEVICE == "cpu" and dtype in (torch.float16, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_low_precision_matches_reference(backend, dtype, reference):
    if not _supports(backend, dtype):
        pytest.skip("half precision in the Triton interpreter is not faithful; tested on the GPU")
    reference.check(backend, make_inputs((3, 11), 40, 24, 8, dtype), dtype, dropout_p=0.1)


def test_frozen_weight_no_bias(backend, reference):
    inputs = make_inputs((9,), 12, 10, 4, torch.float64, bias=False, weight_grad=False)
    reference.check(backend, inputs, torch.float64)


def test_non_contiguous_inputs(backend, reference):
    def strided(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE)

    x = strided(13, 12)[:, ::2].t()  # [6, 13] with strides (2, 12)
    weight = strided(13, 15).t()  # [15, 13] transposed view: what GPT-2's Conv1D passes
    A = strided(4, 26)[:, ::2]
    B = strided(15, 8)[:, ::2]
    b = strided(30)[::2]
    inputs = tuple(t.requires_grad_() for t in (x, weight, b, A, B))
    assert not any(t.is_contiguous() for t in inputs)
    reference.check(backend, inputs, torch.float64, dropout_p=0.2)


def test_expanded_grad_output(backend, reference):
    """y.sum().backward() hands the backward a stride-0 gradient."""
    inputs = make_inputs((7,), 9, 11, 3, torch.float64)
    expanded = torch.ones((), dtype=torch.float64, device=DEVICE).expand(7, 11)
    reference.check(backend, inputs, torch.float64, dropout_p=0.3, grad_y=expanded)


def test_gradcheck(backend):
    x, weight, b, A, B = make_inputs((4,), 6, 5, 2, torch.float64)

    def fn(x, weight, b, A, B):
        return lora_linear(x, weight, b, A, B, 0.8, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight, b, A, B))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck(backend, dropout_p):
    x, weight, b, A, B = make_inputs((5,), 6, 7, 3, torch.float64)
    seed = torch.tensor(17, device=DEVICE) if dropout_p else None
    torch.library.opcheck(torch.ops.lowrank.lora_linear.default, (x, weight, b, A, B, 0.5, dropout_p, seed, backend))
    grad_y = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    xa = (x.detach() @ A.detach().t())
    args = (grad_y, x.detach(), xa, weight.detach(), A.detach(), B.detach(), 0.5, dropout_p, seed)
    torch.library.opcheck(torch.ops.lowrank.lora_linear_backward.default, args + (True, False, True, backend))


@pytest.mark.skipif(lowrank._backends.EXTENSION is None, reason="C++ extension not built")
def test_opcheck_native_ops():
    x, weight, b, A, B = (t.detach() for t in make_inputs((5,), 6, 7, 3, torch.float64))
    seed = torch.tensor(3, device=DEVICE)
    torch.library.opcheck(torch.ops.lowrank.lora_linear_forward_native.default, (x, weight, b, A, B, 0.5, 0.2, seed))
    grad_y, xa = torch.randn(5, 7, dtype=torch.float64, device=DEVICE), x @ A.t()
    torch.library.opcheck(
        torch.ops.lowrank.lora_linear_backward_native.default,
        (grad_y, x, xa, weight, A, B, 0.5, 0.2, seed, True, True, False),
    )


def test_torch_compile_fullgraph(backend, compiles_like_eager):
    x, weight, b, A, B = make_inputs((2, 5), 8, 6, 4, torch.float64)

    def step(x):
        y = lora_linear(x, weight, b, A, B, 0.5, 0.1, backend=backend)
        return torch.nn.functional.gelu(y).sum()

    compiles_like_eager(step, x, (x, A, B))


@pytest.mark.skipif(not AVAILABLE["cpu"].available or DEVICE != "cpu", reason="needs the cpu backend and CPU tensors")
def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    x, weight, b, A, B = make_inputs((4,), 8, 6, 4, torch.float32)
    compiled = torch.compile(lambda x: lora_linear(x, weight, b, A, B, 0.5, backend="cpu"), fullgraph=True)
    torch.testing.assert_close(compiled(x), lora_linear(x, weight, b, A, B, 0.5, backend="torch"))


# ---------------------------------------------------------------- inference path


def test_inference_matches_reference(backend, linear_shape, reference):
    """No gradient and no dropout: the forward-only op (Triton: one launch up to 256 rows)."""
    x, weight, b, A, B = (t.detach() for t in make_inputs(*linear_shape, torch.float64))
    x = x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() == 2 else x  # column-major x
    with torch.no_grad():
        y = lora_linear(x, weight, b, A, B, 0.7, backend=backend)
    reference.assert_close(y, lora_linear_reference(x, weight, b, A, B, 0.7), torch.float64)


def test_inference_runs_the_forward_only_op(monkeypatch):
    import sys

    module = sys.modules["lowrank.ops.lora_linear"]
    calls = []
    for name in ("_lora_linear_op", "_lora_linear_inference_op"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _o=original: calls.append(_n) or _o(*a))
    x, weight, b, A, B = make_inputs((3,), 8, 6, 2, torch.float32)
    with torch.no_grad():
        lora_linear(x, weight, b, A, B, 0.5)
    lora_linear(x.detach(), weight.detach(), b.detach(), A.detach(), B.detach(), 0.5)
    lora_linear(x, weight, b, A, B, 0.5)  # grads needed
    with torch.no_grad():
        lora_linear(x, weight, b, A, B, 0.5, 0.1)  # dropout needs the seed path
    assert calls == ["_lora_linear_inference_op"] * 2 + ["_lora_linear_op"] * 2


def test_opcheck_inference(backend):
    x, weight, b, A, B = (t.detach() for t in make_inputs((5,), 6, 7, 3, torch.float64))
    torch.library.opcheck(torch.ops.lowrank.lora_linear_inference.default, (x, weight, b, A, B, 0.5, backend))


# ---------------------------------------------------------------- dropout


def _lowbias32(h):
    """Independent pure-Python oracle for the hash in hash_dropout."""
    h ^= h >> 16
    h = (h * 0x21F0AAAD) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x735A2D97) & 0xFFFFFFFF
    return h ^ (h >> 15)


def test_hash_mask_matches_python_oracle():
    seed, p = 987654321, 0.4
    mask = hash_dropout.keep_mask(torch.tensor(seed), 6, 9, p, row_offset=3)
    threshold = int(p * 2**32)
    expected = [
        [_lowbias32(col ^ _lowbias32(row ^ _lowbias32(seed))) >= threshold for col in range(9)] for row in range(3, 9)
    ]
    assert mask.tolist() == expected


def test_hash_mask_rate_and_independence():
    p = 0.3
    masks = [hash_dropout.keep_mask(torch.tensor(s), 256, 512, p) for s in (1, 2)]
    for mask in masks:
        assert abs(1 - mask.double().mean().item() - p) < 0.01
    assert (masks[0] != masks[1]).double().mean().item() > 0.3  # different seeds, different masks


def test_dropout_zeroes_lora_path_only(backend):
    """With B = I-like and W = 0 the output exposes dropout(x)·Aᵀ; kept entries are scaled by 1/(1-p)."""
    K = 64
    x = torch.ones(32, K, dtype=torch.float64, device=DEVICE)
    zero_w = torch.zeros(K, K, dtype=torch.float64, device=DEVICE)
    eye = torch.eye(K, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(5)
    y = lora_linear(x, zero_w, None, eye, eye, 1.0, 0.5, backend=backend)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert 0.4 < (y == 0).double().mean().item() < 0.6
    y_eval = lora_linear(x, zero_w, None, eye, eye, 1.0, 0.0, backend=backend)
    assert torch.equal(y_eval, x)


# ---------------------------------------------------------------- dispatch and bad input


def test_autocast_runs_in_autocast_dtype():
    x, weight, b, A, B = (t.detach().float() for t in make_inputs((4,), 8, 6, 2, torch.float32))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = lora_linear(x, weight, b, A, B, 0.5)
    assert y.dtype == torch.bfloat16


def test_env_selects_backend(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "torch")
    assert lowrank._backends.resolve(None, torch.device("cpu"), "lora_linear") == "torch"
    monkeypatch.setenv("LOWRANK_BACKEND", "nonsense")
    x, weight, b, A, B = make_inputs((2,), 4, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="lora_linear: the environment variable LOWRANK_BACKEND: backend must be "
                                         r"None, 'auto' or one of .*, got 'nonsense'"):
        lora_linear(x, weight, b, A, B, 0.5)


def test_backends_report_reason_for_each_unavailable():
    for name, status in lowrank.backends().items():
        assert status.reason and "\n" not in status.reason, name


def test_unavailable_or_wrong_device_backend_is_refused():
    x, weight, b, A, B = make_inputs((2,), 4, 3, 2, torch.float32)
    if not AVAILABLE["cuda"].available:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            lora_linear(x, weight, b, A, B, 1.0, backend="cuda")
    if DEVICE == "cuda" and AVAILABLE["cpu"].available:
        with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors"):
            lora_linear(x, weight, b, A, B, 1.0, backend="cpu")


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda t: {**t, "x": t["x"][:, :3]}, ValueError, r"x has 3 input features .* weight expects 4"),
        (lambda t: {**t, "A": t["A"][:, :3]}, ValueError, r"lora_A must have shape \(2, 4\)"),
        (lambda t: {**t, "B": t["B"][:2]}, ValueError, r"lora_B must have shape \(3, 2\)"),
        (lambda t: {**t, "b": t["b"][:2]}, ValueError, r"bias must have shape \(3,\)"),
        (lambda t: {**t, "A": t["A"][:0], "B": t["B"][:, :0]}, ValueError, r"r=0"),
        (lambda t: {**t, "x": t["x"].double()}, TypeError, r"weight has dtype torch.float32 but x has torch.float64"),
        (lambda t: {**t, "x": t["x"].long()}, TypeError, r"x must be a floating-point tensor"),
        (lambda t: {**t, "weight": t["weight"][None]}, ValueError, r"weight must be 2-D"),
        (lambda t: {**t, "p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
        (lambda t: {**t, "x": t["x"].to("meta")}, ValueError, r"weight is on cpu but x is on meta"),
        (lambda t: {**t, "x": t["x"][:, :0], "weight": t["weight"][:, :0], "A": t["A"][:, :0]}, ValueError,
         r"x has 0 input features \(shape \(2, 0\)\); in_features must be >= 1"),
        (lambda t: {**t, "x": t["x"].tolist()}, TypeError, r"x must be a torch.Tensor, got list"),
        (lambda t: {**t, "s": True}, TypeError, r"scaling must be a Python number, got True"),
        (lambda t: {**t, "backend": "nope"}, ValueError, r"lora_linear: backend must be None, 'auto' or one of"),
    ],
)
def test_bad_input_is_named(mutate, error, message):
    x, weight, b, A, B = (t.detach().cpu() for t in make_inputs((2,), 4, 3, 2, torch.float32))
    t = mutate({"x": x, "weight": weight, "b": b, "A": A, "B": B, "p": 0.0, "s": 0.5, "backend": "torch"})
    with pytest.raises(error, match=message):
        lora_linear(t["x"], t["weight"], t["b"], t["A"], t["B"], t["s"], t["p"], backend=t["backend"])


# Rows below and above K: the cpu backend adds the low-rank term to y, or merges it into W first.
@pytest.mark.parametrize("lead,K,N,r", [((6,), 9, 7, 3), ((40,), 9, 7, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("poisoned", ["lora_A", "lora_B"])
def test_nan_propagates_at_zero_scaling(backend, lead, K, N, r, dtype, dropout_p, poisoned, reference):
    """s·(x·Aᵀ)·Bᵀ is NaN where A or B holds a NaN, also at s=0: every backend must say so (a GEMM
    with alpha=s would skip the product and hide it)."""
    inputs = make_inputs(lead, K, N, r, dtype)
    with torch.no_grad():
        inputs[3 if poisoned == "lora_A" else 4][1, 2] = float("nan")
    (y, grads), (y_ref, grads_ref) = reference.run(backend, inputs, scaling=0.0, dropout_p=dropout_p)
    assert y_ref.isnan().any()
    for ours, ref in zip((y, *grads), (y_ref, *grads_ref)):
        assert torch.equal(ours.isnan(), ref.isnan())
    if dropout_p == 0.0:
        with torch.no_grad():  # the forward-only op
            assert torch.equal(lora_linear(*inputs, 0.0, backend=backend).isnan(), y_ref.isnan())
