"""lowrank.ops.multi_lora_linear: every available backend against the float64 reference (each
adapter's term on its own rows), and the property the op exists for: in a mixed batch each
adapter gets exactly the gradients it gets from training alone on its own rows."""

import pytest
import torch

import lowrank
from lowrank.ops import lora_linear, multi_lora_linear, multi_lora_linear_reference

AVAILABLE = lowrank.backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (lead shape of x, K, N, r, adapters): block-size-unfriendly sizes, M=1, M=0, 3-D inputs, r=1,
# and long segments (the Triton reduction splits them into slices).
SHAPES = [
    ((1,), 5, 7, 3, 2),
    ((0,), 8, 6, 4, 3),
    ((37,), 70, 45, 16, 4),
    ((65,), 33, 129, 1, 3),
    ((2, 3), 17, 19, 5, 2),
    ((200,), 20, 12, 4, 2),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
GRAD_NAMES = ("dx", "dW", "db", "dA", "dB")


def make_inputs(lead, K, N, r, count, dtype, bias=True, weight_grad=True, seed=0):
    """(x, weight, bias, lora_A, lora_B) requiring grad, and an index that leaves the last adapter
    without rows and gives some rows no adapter (-1)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, requires_grad=True):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) / max(shape[-1], 1) ** 0.5
        return t.to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)

    tensors = (rand(*lead, K), rand(N, K, requires_grad=weight_grad), rand(N) if bias else None,
               rand(count, r, K), rand(count, N, r))
    index = torch.randint(-1, count - 1, lead, generator=gen).to(DEVICE)
    return tensors, index


def scalings(count):
    return [0.5 + 0.25 * a for a in range(count)]


def rates(count, p):
    """One rate for every adapter, or with p=None a different rate per adapter (0 included)."""
    return [p] * count if p is not None else [0.1 * (a % 4) for a in range(count)]


@pytest.fixture(scope="module")
def reference(reference_check):
    """reference(index): the op against its float64 reference (tests/ops/conftest.py), the rows'
    adapters bound to `index`."""

    def bind(index):
        def op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend):
            return multi_lora_linear(x, weight, bias, index, lora_A, lora_B, scaling, dropout_p, backend=backend)

        def formula(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
            return multi_lora_linear_reference(x, weight, bias, index, lora_A, lora_B, scaling, dropout_p, seed)

        return reference_check(op, formula, TOLERANCE, GRAD_NAMES)

    return bind


@pytest.mark.parametrize("lead,K,N,r,count", SHAPES)
@pytest.mark.parametrize("p", [0.0, None], ids=["no-dropout", "dropout-per-adapter"])
def test_float64_matches_reference(backend, lead, K, N, r, count, p, reference):
    inputs, index = make_inputs(lead, K, N, r, count, torch.float64)
    reference(index).check(backend, inputs, torch.float64, scaling=scalings(count), dropout_p=rates(count, p))


def _supports(backend, dtype):
    # The Triton interpreter does not model half precision faithfully: those run on the GPU.
    return not (backend == "triton" and DEVICE == "cpu" and dtype in (torch.float16, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("p", [0.0, None], ids=["no-dropout", "dropout-per-adapter"])
def test_low_precision_matches_reference(backend, dtype, p, reference):
    if not _supports(backend, dtype):
        pytest.skip("half precision in the Triton interpreter is not faithful; tested on the GPU")
    inputs, index = make_inputs((3, 31), 40, 24, 8, 5, dtype)
    reference(index).check(backend, inputs, dtype, scaling=scalings(5), dropout_p=rates(5, p))


def test_frozen_weight_no_bias_int32_index(backend, reference):
    inputs, index = make_inputs((9,), 12, 10, 4, 3, torch.float64, bias=False, weight_grad=False)
    reference(index.int()).check(backend, inputs, torch.float64, scaling=scalings(3))


def test_non_contiguous_inputs(backend, reference):
    def strided(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE)

    x = strided(13, 12)[:, ::2].t()  # [6, 13] with strides (2, 12)
    weight = strided(13, 15).t()  # [15, 13] transposed view: what GPT-2's Conv1D passes
    A = strided(3, 4, 26)[:, :, ::2]
    B = strided(3, 8, 15).transpose(1, 2)[:, :, ::2]
    b = strided(30)[::2]
    index = torch.tensor([0, 2, -1, 2, 0, 1] * 2, device=DEVICE)[::2]
    inputs = tuple(t.requires_grad_() for t in (x, weight, b, A, B))
    assert not any(t.is_contiguous() for t in (*inputs, index))
    reference(index).check(backend, inputs, torch.float64, scaling=scalings(3), dropout_p=[0.2, 0.0, 0.4])


def test_expanded_grad_output(backend, reference):
    """y.sum().backward() hands the backward a stride-0 gradient."""
    inputs, index = make_inputs((7,), 9, 11, 3, 3, torch.float64)
    expanded = torch.ones((), dtype=torch.float64, device=DEVICE).expand(7, 11)
    reference(index).check(backend, inputs, torch.float64, scaling=scalings(3), dropout_p=0.3, grad_y=expanded)


# ---------------------------------------------------------------- the mixed-batch properties


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_every_row_one_adapter_equals_lora_linear(backend, dropout_p):
    """All rows on adapter 1: the output and every gradient are lora_linear's with that adapter
    (with the same seed, the same dropout mask too); the other adapters get zero gradients."""
    (x, weight, b, A, B), _ = make_inputs((23,), 14, 9, 4, 3, torch.float64)
    index = torch.ones(23, dtype=torch.int64, device=DEVICE)
    torch.manual_seed(7)
    y = multi_lora_linear(x, weight, b, index, A, B, [0.3, 1.7, 0.9], dropout_p, backend=backend)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight, b, A, B), grad_y)
    A1, B1 = A.detach()[1].clone().requires_grad_(), B.detach()[1].clone().requires_grad_()
    torch.manual_seed(7)
    y_single = lora_linear(x, weight, b, A1, B1, 1.7, dropout_p, backend="torch")
    grads_single = torch.autograd.grad(y_single, (x, weight, b, A1, B1), grad_y)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, y_single, **tol)
    for ours, single in zip(grads[:3], grads_single[:3]):
        torch.testing.assert_close(ours, single, **tol)
    torch.testing.assert_close(grads[3][1], grads_single[3], **tol)
    torch.testing.assert_close(grads[4][1], grads_single[4], **tol)
    for unused in (0, 2):
        assert torch.equal(grads[3][unused], torch.zeros_like(grads[3][unused]))
        assert torch.equal(grads[4][unused], torch.zeros_like(grads[4][unused]))


def test_each_adapter_gets_the_gradients_of_training_alone_on_its_rows(backend):
    """The key property: in a mixed batch, dA[a] and dB[a] (and dx on a's rows) are exactly what
    training adapter a alone on its own rows gives; rows with -1 add nothing to any adapter and
    get the frozen layer's output and input gradient; an adapter without rows gets zero."""
    (x, weight, b, A, B), index = make_inputs((61,), 22, 17, 5, 4, torch.float64)
    scaling = scalings(4)
    y = multi_lora_linear(x, weight, b, index, A, B, scaling, backend=backend)
    grad_y = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), grad_y)
    tol = dict(rtol=1e-10, atol=1e-10)
    for adapter in range(4):
        rows = (index == adapter).nonzero().squeeze(1)
        x_alone = x.detach()[rows].requires_grad_()
        A_alone, B_alone = (t.detach()[adapter].clone().requires_grad_() for t in (A, B))
        y_alone = lora_linear(x_alone, weight.detach(), b.detach(), A_alone, B_alone, scaling[adapter], backend="torch")
        dx_alone, dA_alone, dB_alone = torch.autograd.grad(y_alone, (x_alone, A_alone, B_alone), grad_y[rows])
        torch.testing.assert_close(y[rows], y_alone, **tol)
        torch.testing.assert_close(dx[rows], dx_alone, **tol)
        torch.testing.assert_close(dA[adapter], dA_alone, **tol)
        torch.testing.assert_close(dB[adapter], dB_alone, **tol)
        if rows.numel() == 0:
            assert adapter == 3 and not dA[adapter].any() and not dB[adapter].any()
    unadapted = (index == -1).nonzero().squeeze(1)
    assert unadapted.numel() > 0
    torch.testing.assert_close(y[unadapted], torch.nn.functional.linear(x[unadapted], weight, b), **tol)
    torch.testing.assert_close(dx[unadapted], grad_y[unadapted] @ weight.detach(), **tol)


def test_rows_without_adapters_leave_the_layer_frozen(backend):
    (x, weight, b, A, B), _ = make_inputs((12,), 10, 8, 3, 2, torch.float64)
    index = torch.full((12,), -1, dtype=torch.int64, device=DEVICE)
    y = multi_lora_linear(x, weight, b, index, A, B, 2.0, 0.5, backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, b), rtol=1e-12, atol=1e-12)
    dA, dB = torch.autograd.grad(y.sum(), (A, B))
    assert not dA.any() and not dB.any()


def test_mixed_ranks_are_zero_padded_and_the_padding_gets_zero_gradient(backend):
    """Adapters of ranks 2, 5 and 3 stored at r = 5: each matches its unpadded lora_linear, and
    the padded rows of A and columns of B get exactly zero gradient."""
    ranks, K, N, M = (2, 5, 3), 13, 11, 40
    gen = torch.Generator().manual_seed(5)
    factors = [(torch.randn(r, K, generator=gen, dtype=torch.float64), torch.randn(N, r, generator=gen,
                dtype=torch.float64)) for r in ranks]
    A = torch.zeros(3, 5, K, dtype=torch.float64)
    B = torch.zeros(3, N, 5, dtype=torch.float64)
    for adapter, (a, b_factor) in enumerate(factors):
        A[adapter, : a.shape[0]], B[adapter, :, : a.shape[0]] = a, b_factor
    x = torch.randn(M, K, generator=gen, dtype=torch.float64).to(DEVICE)
    weight = torch.randn(N, K, generator=gen, dtype=torch.float64).to(DEVICE)
    index = torch.arange(M, device=DEVICE) % 3
    A, B = A.to(DEVICE).requires_grad_(), B.to(DEVICE).requires_grad_()
    scaling = [16 / r for r in ranks]  # alpha / r_a, as PEFT scales each adapter
    y = multi_lora_linear(x, weight, None, index, A, B, scaling, backend=backend)
    dA, dB = torch.autograd.grad(y, (A, B), torch.randn_like(y))
    for adapter, (a, b_factor) in enumerate(factors):
        rows = index == adapter
        expected = lora_linear(x[rows], weight, None, a.to(DEVICE), b_factor.to(DEVICE), scaling[adapter],
                               backend="torch")
        torch.testing.assert_close(y[rows], expected, rtol=1e-10, atol=1e-10)
        assert torch.equal(dA[adapter, ranks[adapter]:], torch.zeros_like(dA[adapter, ranks[adapter]:]))
        assert torch.equal(dB[adapter, :, ranks[adapter]:], torch.zeros_like(dB[adapter, :, ranks[adapter]:]))
        assert dA[adapter, : ranks[adapter]].abs().min() > 0


def test_dropout_rates_are_per_adapter(backend):
    """W = 0, A = B = I: y exposes D⊙x per row; adapter 0 (p = 0) keeps everything, adapter 1
    (p = 0.5) about half, scaled by 2, and rows without an adapter get nothing."""
    K = 64
    x = torch.ones(48, K, dtype=torch.float64, device=DEVICE)
    eye = torch.eye(K, dtype=torch.float64, device=DEVICE).expand(2, K, K)
    index = torch.tensor([0, 1, -1] * 16, device=DEVICE)
    torch.manual_seed(5)
    y = multi_lora_linear(x, torch.zeros(K, K, dtype=torch.float64, device=DEVICE), None, index, eye, eye, 1.0,
                          [0.0, 0.5], backend=backend)
    assert torch.equal(y[index == 0], x[index == 0])
    assert set(y[index == 1].unique().tolist()) == {0.0, 2.0}
    assert 0.4 < (y[index == 1] == 0).double().mean().item() < 0.6
    assert not y[index == -1].any()


# ---------------------------------------------------------------- autograd, opcheck, compile


def _op_inputs(dtype=torch.float64):
    (x, weight, b, A, B), index = make_inputs((5,), 6, 7, 3, 3, dtype)
    return x, weight, b, index, A, B


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck(backend, dropout_p):
    """Through the custom op with a fixed seed, so every evaluation draws the same mask."""
    (x, weight, b, A, B), index = make_inputs((4,), 5, 3, 2, 2, torch.float64)
    index = torch.tensor([1, -1, 0, 1], device=DEVICE)
    seed = torch.tensor(11, device=DEVICE) if dropout_p else None

    def fn(x, weight, b, A, B):
        return torch.ops.lowrank.multi_lora_linear(x, weight, b, index, A, B, [0.8, 1.3], [dropout_p, dropout_p],
                                                   seed, backend)[0]

    assert torch.autograd.gradcheck(fn, (x, weight, b, A, B))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck(backend, dropout_p):
    x, weight, b, index, A, B = _op_inputs()
    seed = torch.tensor(17, device=DEVICE) if dropout_p else None
    scaling, rates_ = [0.5, 1.0, 2.0], [dropout_p, 0.0, dropout_p]
    torch.library.opcheck(torch.ops.lowrank.multi_lora_linear.default,
                          (x, weight, b, index, A, B, scaling, rates_, seed, backend))
    grad_y = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    _, xa = torch.ops.lowrank.multi_lora_linear(x.detach(), weight.detach(), b.detach(), index, A.detach(),
                                                B.detach(), scaling, rates_, seed, backend)
    args = (grad_y, x.detach(), xa, weight.detach(), index, A.detach(), B.detach(), scaling, rates_, seed)
    torch.library.opcheck(torch.ops.lowrank.multi_lora_linear_backward.default, args + (True, False, True, backend))


@pytest.mark.skipif(lowrank._backends.EXTENSION is None, reason="C++ extension not built")
def test_opcheck_native_ops():
    x, weight, b, index, A, B = (t.detach() for t in _op_inputs())
    seed = torch.tensor(3, device=DEVICE)
    scaling, rates_ = [0.5, 1.0, 2.0], [0.2, 0.0, 0.1]
    torch.library.opcheck(torch.ops.lowrank.multi_lora_linear_forward_native.default,
                          (x, weight, b, index, A, B, scaling, rates_, seed))
    _, xa = torch.ops.lowrank.multi_lora_linear_forward_native(x, weight, b, index, A, B, scaling, rates_, seed)
    grad_y = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(torch.ops.lowrank.multi_lora_linear_backward_native.default,
                          (grad_y, x, xa, weight, index, A, B, scaling, rates_, seed, True, True, False))


def test_torch_compile_fullgraph(backend, compiles_like_eager):
    (x, weight, b, A, B), index = make_inputs((2, 5), 8, 6, 4, 3, torch.float64)

    def step(x):
        y = multi_lora_linear(x, weight, b, index, A, B, [0.5, 1.0, 1.5], [0.1, 0.0, 0.2], backend=backend)
        return torch.nn.functional.gelu(y).sum()

    compiles_like_eager(step, x, (x, A, B))


@pytest.mark.skipif(not AVAILABLE["cpu"].available or DEVICE != "cpu", reason="needs the cpu backend and CPU tensors")
def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    (x, weight, b, A, B), index = make_inputs((4,), 8, 6, 4, 2, torch.float32)
    compiled = torch.compile(lambda x: multi_lora_linear(x, weight, b, index, A, B, 0.5, backend="cpu"),
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), multi_lora_linear(x, weight, b, index, A, B, 0.5, backend="torch"))


def test_autocast_runs_in_autocast_dtype():
    (x, weight, b, A, B), index = make_inputs((4,), 8, 6, 2, 2, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = multi_lora_linear(x, weight, b, index, A, B, 0.5)
    assert y.dtype == torch.bfloat16


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad_value, row", [(3, 2), (-2, 0), (2**40, 1)])
def test_out_of_range_index_is_named(backend, bad_value, row):
    """Checked where the rows are grouped, inside the op: a ValueError naming the first bad row
    (on CPU tensors; CUDA tensors get an asynchronous device assert instead)."""
    if DEVICE != "cpu":
        pytest.skip("CUDA tensors are checked by a device assert, which ends the CUDA context")
    (x, weight, b, A, B), _ = make_inputs((4,), 5, 3, 2, 3, torch.float64)
    index = torch.tensor([0, 1, 2, -1])
    index[row] = bad_value
    message = (r"adapter_index must hold -1 \(no adapter\) or an adapter in \[0, 3\); "
               rf"adapter_index\[{row}\] = {bad_value}")
    with pytest.raises(ValueError, match=message):
        multi_lora_linear(x, weight, b, index, A, B, 1.0, backend=backend)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda t: {**t, "index": t["index"].float()}, TypeError, r"adapter_index must be an int32 or int64 tensor"),
        (lambda t: {**t, "index": t["index"][:3]}, ValueError,
         r"adapter_index must have x's leading shape \(4,\) or \(4,\), one adapter per row, got shape \(3,\)"),
        (lambda t: {**t, "index": t["index"].to("meta")}, ValueError, r"adapter_index is on meta but x is on cpu"),
        (lambda t: {**t, "index": [0, 1, 0, 1]}, TypeError, r"adapter_index must be a torch.Tensor"),
        (lambda t: {**t, "x": t["x"][:, :3]}, ValueError, r"x has 3 input features .* weight expects 5"),
        (lambda t: {**t, "A": t["A"][0]}, ValueError, r"lora_A must be 3-D \[n_adapters, r, in_features\]"),
        (lambda t: {**t, "A": t["A"][:, :, :4]}, ValueError, r"lora_A must have shape \(2, 3, 5\)"),
        (lambda t: {**t, "B": t["B"][:1]}, ValueError, r"lora_B must have shape \(2, 6, 3\)"),
        (lambda t: {**t, "A": t["A"][:, :0], "B": t["B"][:, :, :0]}, ValueError, r"rank r >= 1"),
        (lambda t: {**t, "b": t["b"][:2]}, ValueError, r"bias must have shape \(6,\)"),
        (lambda t: {**t, "x": t["x"].double()}, TypeError, r"weight has dtype torch.float32 but x has torch.float64"),
        (lambda t: {**t, "s": [1.0, 2.0, 3.0]}, ValueError, r"scaling must hold one number per adapter \(2"),
        (lambda t: {**t, "s": "big"}, ValueError, r"scaling must hold one number per adapter"),
        (lambda t: {**t, "p": [0.1, 1.0]}, ValueError, r"each dropout_p must be in \[0, 1\)"),
        (lambda t: {**t, "x": t["x"][:, :0], "weight": t["weight"][:, :0], "A": t["A"][:, :, :0]}, ValueError,
         r"x has 0 input features \(shape \(4, 0\)\); in_features must be >= 1"),
        (lambda t: {**t, "backend": "nope"}, ValueError, r"multi_lora_linear: backend must be None, 'auto' or one of"),
    ],
)
def test_bad_input_is_named(mutate, error, message):
    gen = torch.Generator().manual_seed(0)
    t = {"x": torch.randn(4, 5, generator=gen), "weight": torch.randn(6, 5, generator=gen),
         "b": torch.randn(6, generator=gen), "index": torch.tensor([0, 1, -1, 1]),
         "A": torch.randn(2, 3, 5, generator=gen), "B": torch.randn(2, 6, 3, generator=gen), "s": 0.5, "p": 0.0,
         "backend": "torch"}
    t = mutate(t)
    with pytest.raises(error, match=message):
        multi_lora_linear(t["x"], t["weight"], t["b"], t["index"], t["A"], t["B"], t["s"], t["p"],
                          backend=t["backend"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("poisoned", ["lora_A", "lora_B"])
def test_nan_propagates_at_zero_scaling(backend, dtype, dropout_p, poisoned, reference):
    """s[a]·(x·A[a]ᵀ)·B[a]ᵀ is NaN where A[a] or B[a] holds a NaN, also at s[a]=0, and on adapter
    a's rows only: every backend must say so (a GEMM with alpha=s would skip the product and hide
    it; a product of the zeros of other rows with a's factor would carry it into them). Adapter
    1 (scaling 0) and adapter 2 (no rows) are poisoned; rows with -1 and adapter 0 are not."""
    inputs, index = make_inputs((40,), 9, 7, 3, 3, dtype)
    assert (index == 0).any() and (index == 1).any() and (index == -1).any() and not (index == 2).any()
    with torch.no_grad():
        factor = inputs[3 if poisoned == "lora_A" else 4]
        factor[1, 1, 2] = factor[2, 0, 1] = float("nan")
    (y, grads), (y_ref, grads_ref) = reference(index).run(backend, inputs, [0.5, 0.0, 1.5], dropout_p)
    assert y_ref[index == 1].isnan().any() and not y_ref[index != 1].isnan().any()
    for ours, ref in zip((y, *grads), (y_ref, *grads_ref)):
        assert torch.equal(ours.isnan(), ref.isnan())


@pytest.mark.skipif(lowrank._backends.EXTENSION is None, reason="C++ extension not built")
def test_native_ops_check_their_inputs():
    """The C++ ops check what they are handed, for callers that skip the Python wrapper."""
    x, weight, b, index, A, B = (t.detach().cpu() for t in _op_inputs())
    forward = torch.ops.lowrank.multi_lora_linear_forward_native
    with pytest.raises(RuntimeError, match=r"scaling must hold one number per adapter \(3\), got 2"):
        forward(x, weight, b, index, A, B, [1.0, 1.0], [0.0] * 3, None)
    with pytest.raises(RuntimeError, match=r"adapter_index must be an int32 or int64 tensor"):
        forward(x, weight, b, index.float(), A, B, [1.0] * 3, [0.0] * 3, None)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[n_adapters, N, r\]"):
        forward(x, weight, b, index, A, B[:, :3], [1.0] * 3, [0.0] * 3, None)
    with pytest.raises(RuntimeError, match=r"dropout_p = 0.5 > 0 needs a seed"):
        forward(x, weight, b, index, A, B, [1.0] * 3, [0.5, 0.0, 0.0], None)


# ---------------------------------------------------------------- Triton-specific risks


@pytest.mark.skipif(not AVAILABLE["triton"].available, reason=AVAILABLE["triton"].reason)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_triton_writes_every_output_element(dropout_p, poisoned_empty, reference):
    """torch.empty returns NaN (poisoned_empty): an element the Triton kernels forget to write
    shows up. Rows without an adapter, an adapter without rows, and segment reductions split into
    slices (200 rows over 2 adapters) are the risky ones."""
    inputs, index = make_inputs((200,), 20, 12, 4, 3, torch.float64)
    assert (index == -1).any() and not (index == 2).any()
    reference(index).check("triton", inputs, torch.float64, scaling=scalings(3), dropout_p=dropout_p)
