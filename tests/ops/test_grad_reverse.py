"""lowrank.ops.grad_reverse, lowrank.nn.GradientReversal and the DANN λ schedule: every available
backend against −λ·grad in float64, the no-copy forward, when the in-place backward is (and is
not) taken, gradcheck, opcheck, and torch.compile without recompiles as λ changes."""

import math

import pytest
import torch
from torch._dynamo.utils import counters
from torch.autograd.gradcheck import GradcheckError

import lowrank
from lowrank.nn import DANNLambdaScheduler, GradientReversal, dann_lambda
from lowrank.ops import (
    grad_reverse,
    grad_reverse as grad_reverse_module,  # noqa: F401  (the function shadows the module)
)
from lowrank.ops.grad_reverse import _owned_counts

AVAILABLE = lowrank.backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
IN_PLACE_OP = "lowrank::grad_reverse_backward_"


def randn(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


# Gradients with the layouts autograd hands a backward. Sizes avoid multiples of the Triton
# interpreter's block (64), the CUDA packet widths and the CPU vector widths.
def _grad_cases():
    stepped7 = randn(*(3,) * 7)[(slice(None, None, 2),) * 7]  # 7 dims no merge can fuse
    return {
        "empty": randn(0, 5),
        "one": randn(1),
        "odd_1d": randn(1001),
        "3d": randn(3, 37, 11),
        "transposed": randn(11, 37).t(),
        "sliced": randn(13, 40)[:, 1::3],
        "transposed_slice": randn(16, 9)[::2].t(),
        "expanded_scalar": randn(()).expand(7, 13),
        "expanded_row": randn(1, 29).expand(5, 29),
        "channels_last_slice": randn(2, 3, 5, 9).to(memory_format=torch.channels_last)[..., ::2],
        "seven_dims_stepped": stepped7,
    }


GRAD_CASES = _grad_cases()


def assert_reversed(out, grad, lambda_, dtype):
    expected = -float(lambda_) * grad.double()
    assert out.shape == grad.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def _supports(backend, dtype):
    return not (backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16)


# ---------------------------------------------------------------- forward


def test_forward_is_a_view_without_copy(backend):
    x = randn(6, 5).requires_grad_()
    y = grad_reverse(x, 0.7, backend=backend)
    assert y.data_ptr() == x.data_ptr() and y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert y._base is x and torch.equal(y, x)
    module = GradientReversal(0.3, backend=backend)
    assert module(x).data_ptr() == x.data_ptr()


# ---------------------------------------------------------------- backward against float64


@pytest.mark.parametrize("case", GRAD_CASES)
def test_backward_op_matches_reference(backend, case):
    grad = GRAD_CASES[case]
    lambda_ = torch.tensor(0.37, dtype=torch.float64)
    out = torch.ops.lowrank.grad_reverse_backward(grad, lambda_, backend)
    assert_reversed(out, grad, 0.37, torch.float64)
    assert out.stride() == torch.empty_like(grad).stride()  # the layout the fake promises
    assert out.data_ptr() != grad.data_ptr() or grad.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", ["odd_1d", "transposed_slice", "expanded_row"])
def test_backward_op_low_precision(backend, dtype, case):
    if not _supports(backend, dtype):
        pytest.skip("the Triton interpreter does not model bf16 faithfully; tested on the GPU")
    grad = GRAD_CASES[case].to(dtype)
    out = torch.ops.lowrank.grad_reverse_backward(grad, torch.tensor(0.3, dtype=torch.float64), backend)
    assert_reversed(out, grad, 0.3, dtype)


@pytest.mark.parametrize("case", ["empty", "one", "odd_1d", "3d", "transposed", "channels_last"])
def test_in_place_op_matches_reference(backend, case):
    grad = (
        randn(2, 3, 5, 9).to(memory_format=torch.channels_last) if case == "channels_last" else GRAD_CASES[case].clone()
    )
    if case == "transposed":
        grad = GRAD_CASES[case].clone(memory_format=torch.preserve_format)
    before, pointer, strides = grad.clone(), grad.data_ptr(), grad.stride()
    torch.ops.lowrank.grad_reverse_backward_(grad, torch.tensor(1.7, dtype=torch.float64), backend)
    assert grad.data_ptr() == pointer and grad.stride() == strides
    assert_reversed(grad, before, 1.7, torch.float64)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_in_place_op_refuses_overlapping_grad(backend):
    if not AVAILABLE[backend].available or DEVICE != "cpu":
        pytest.skip(AVAILABLE[backend].reason or "CPU-only check")
    expanded = randn(()).expand(4, 3)
    with pytest.raises((RuntimeError, ValueError), match="dense"):
        torch.ops.lowrank.grad_reverse_backward_(expanded, torch.tensor(1.0, dtype=torch.float64), backend)


@pytest.mark.parametrize("case", GRAD_CASES)
def test_autograd_backward_with_given_grad(backend, case):
    grad = GRAD_CASES[case]
    x = randn(*grad.shape, seed=1).requires_grad_()
    kept = grad.clone()
    (dx,) = torch.autograd.grad(grad_reverse(x, 0.55, backend=backend), x, grad)
    assert_reversed(dx, grad, 0.55, torch.float64)
    assert torch.equal(grad, kept)  # the caller's gradient was not overwritten


def test_non_contiguous_and_3d_input(backend):
    x = randn(9, 4, 7).transpose(0, 2).requires_grad_()
    y = grad_reverse(x, torch.tensor(0.25, dtype=torch.float64), backend=backend)
    (y * 3).sum().backward()
    assert_reversed(x.grad, torch.full_like(x, 3.0), 0.25, torch.float64)


# ---------------------------------------------------------------- in place only when safe


def _ops_run(fn):
    """Names of lowrank ops run during fn(), from the profiler (which holds no tensors)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return {event.name for event in profile.events() if event.name.startswith("lowrank::grad_reverse")}


def test_ownership_counts_were_calibrated():
    grad_reverse(randn(2).requires_grad_(), 1.0)
    assert _owned_counts[torch.device(DEVICE).type] is not None, "no in-place reuse on this build: see _calibrate"


def test_owned_grad_is_reversed_in_place(backend):
    x = randn(5, 7).requires_grad_()
    ran = _ops_run(lambda: (grad_reverse(x, 0.5, backend=backend) * 4).sum().backward())
    assert IN_PLACE_OP in ran
    assert_reversed(x.grad, torch.full_like(x, 4.0), 0.5, torch.float64)


def _shared_cases(backend):
    """(name, fn(x) -> (loss, check after backward), ...) where the gradient reaching the
    reversal is also needed elsewhere."""
    lam = 0.5

    def leaf_in_two_branches(x):
        # add's backward hands the same tensor to the reversal and to x's AccumulateGrad
        loss = ((grad_reverse(x, lam, backend=backend) + x) * 3).sum()
        return loss, lambda: torch.testing.assert_close(x.grad, torch.full_like(x, 3 * (1 - lam)))

    def same_tensor_two_branches(x):
        a = x * 1
        loss = (a * 5 + grad_reverse(a, lam, backend=backend)).mul(2).sum()
        return loss, lambda: torch.testing.assert_close(x.grad, torch.full_like(x, 2 * (5 - lam)))

    def retained_output_grad(x):
        y = grad_reverse(x, lam, backend=backend)
        y.retain_grad()
        loss = (y * 2).sum()

        def check():
            torch.testing.assert_close(y.grad, torch.full_like(x, 2.0))
            torch.testing.assert_close(x.grad, torch.full_like(x, -2 * lam))

        return loss, check

    def hook_keeps_grad(x):
        kept = []
        y = grad_reverse(x, lam, backend=backend)
        y.register_hook(kept.append)
        loss = (y * 2).sum()

        def check():
            torch.testing.assert_close(kept[0], torch.full_like(x, 2.0))
            torch.testing.assert_close(x.grad, torch.full_like(x, -2 * lam))

        return loss, check

    def view_of_cat_grad(x):
        loss = (torch.cat([grad_reverse(x, lam, backend=backend), x]) * 2).sum()
        return loss, lambda: torch.testing.assert_close(x.grad, torch.full_like(x, 2 * (1 - lam)))

    def expanded_sum_grad(x):
        loss = grad_reverse(x, lam, backend=backend).sum()
        return loss, lambda: torch.testing.assert_close(x.grad, torch.full_like(x, -lam))

    return [leaf_in_two_branches, same_tensor_two_branches, retained_output_grad, hook_keeps_grad,
            view_of_cat_grad, expanded_sum_grad]


@pytest.mark.parametrize("index", range(6), ids=["leaf_two_branches", "same_tensor_two_branches", "retain_grad",
                                                  "hook_keeps_grad", "cat_view", "expanded_sum"])
def test_shared_grad_is_not_overwritten(backend, index):
    x = randn(4, 6).requires_grad_()
    loss, check = _shared_cases(backend)[index](x)
    ran = _ops_run(loss.backward)
    check()
    # Where the other holder is sure to still hold the gradient when the reversal runs, it must
    # be copied. (A second branch may finish with it first, and retain_grad stores a clone:
    # there, reuse is allowed and only the values must be right.)
    if index in (0, 3, 4, 5):
        assert IN_PLACE_OP not in ran, ran


def test_create_graph_never_overwrites():
    x = randn(3, 4).requires_grad_()
    ran = _ops_run(lambda: torch.autograd.grad((grad_reverse(x, 0.5) * x).sum(), x, create_graph=True))
    assert IN_PLACE_OP not in ran


# ---------------------------------------------------------------- gradcheck, opcheck


def test_gradcheck_backward_op(backend):
    """The reversal's forward/backward pair is deliberately not a true gradient (gradcheck on it
    must fail); the backward op is an honest function, −λ·g, with its own backward."""
    grad = randn(3, 5).requires_grad_()
    lambda_ = torch.tensor(0.8, dtype=torch.float64)
    fn = lambda g: torch.ops.lowrank.grad_reverse_backward(g, lambda_, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (grad,))
    assert torch.autograd.gradgradcheck(fn, (grad,))
    with pytest.raises(GradcheckError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(lambda t: grad_reverse(t, 0.8, backend=backend), (randn(4).requires_grad_(),))


def test_double_backward(backend):
    x = randn(3, 4).requires_grad_()
    (dx,) = torch.autograd.grad(grad_reverse(x, 0.5, backend=backend).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(dx, -0.5 * 2 * x)
    # dx = −λ·2y with y = grad_reverse(x): differentiating it again reverses twice, +2λ².
    (ddx,) = torch.autograd.grad(dx.sum(), x)
    torch.testing.assert_close(ddx, torch.full_like(x, 2 * 0.5**2))


@pytest.mark.parametrize("case", ["odd_1d", "transposed_slice", "expanded_scalar"])
def test_opcheck(backend, case):
    grad = GRAD_CASES[case]
    lambda_ = torch.tensor(0.6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lowrank.grad_reverse_backward.default, (grad, lambda_, backend))
    dense = grad.contiguous()
    torch.library.opcheck(torch.ops.lowrank.grad_reverse_backward_.default, (dense, lambda_, backend))


@pytest.mark.skipif(lowrank._backends.EXTENSION is None, reason="C++ extension not built")
def test_opcheck_native_ops():
    lambda_ = torch.tensor(0.6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lowrank.grad_reverse_backward_native.default, (GRAD_CASES["sliced"], lambda_))
    torch.library.opcheck(torch.ops.lowrank.grad_reverse_backward_native_.default, (randn(5, 3), lambda_))


# ---------------------------------------------------------------- torch.compile


def _compiled_steps(model, lambdas, set_lambda, compile_backend):
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    x = randn(4, 6).requires_grad_()
    for value in lambdas:
        set_lambda(value)
        x.grad = None
        compiled(x).backward()
        assert_reversed(x.grad, torch.full_like(x, 2.0), value, torch.float64)
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_module_lambda_changes_without_recompile(backend, compile_backend):
    if compile_backend == "inductor" and DEVICE == "cpu" and backend == "triton":
        pytest.skip("inductor on CPU with the Triton interpreter: covered by aot_eager")
    layer = GradientReversal(0.0, backend=backend)
    model = lambda x: (layer(x) * 2).sum()  # noqa: E731
    graphs = _compiled_steps(model, [0.0, 0.1, 0.45, 0.9], lambda v: setattr(layer, "lambda_", v), compile_backend)
    assert graphs == 1


def test_compile_float_lambda_recompiles_at_most_once():
    state = {}
    model = lambda x: (grad_reverse(x, state["lambda"]) * 2).sum()  # noqa: E731
    lambdas = [0.1, 0.2, 0.3, 0.4, 0.5]
    graphs = _compiled_steps(model, lambdas, lambda v: state.__setitem__("lambda", v), "aot_eager")
    assert graphs <= 2  # the first value is specialised; after one change Dynamo traces λ symbolically


def test_compile_float_lambda_as_argument():
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda x, lam: (grad_reverse(x, lam) * 2).sum(), fullgraph=True, backend="aot_eager")
    x = randn(3).requires_grad_()
    for value in (0.2, 0.4, 0.6, 0.8):
        x.grad = None
        compiled(x, value).backward()
        assert_reversed(x.grad, torch.full_like(x, 2.0), value, torch.float64)
    assert counters["stats"]["unique_graphs"] <= 2


# ---------------------------------------------------------------- module


def test_module_lambda_is_settable_and_reported():
    layer = GradientReversal(0.25)
    assert layer.lambda_ == 0.25 and "lambda_=0.25" in repr(layer)
    layer.lambda_ = 0.75
    assert layer.lambda_ == 0.75
    x = randn(3, 2).requires_grad_()
    (layer(x) * 2).sum().backward()
    assert_reversed(x.grad, torch.full_like(x, 2.0), 0.75, torch.float64)
    assert "_lambda" not in layer.state_dict()


def test_module_keeps_lambda_exact_through_dtype_casts():
    layer = GradientReversal(0.3).half()
    assert layer._lambda.dtype == torch.float64 and layer.lambda_ == 0.3
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), GradientReversal(0.1)).to(torch.bfloat16)
    assert model[1]._lambda.dtype == torch.float64 and model[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", None, True])
def test_module_rejects_bad_lambda(bad):
    with pytest.raises(ValueError, match="GradientReversal: lambda_ must be a finite number"):
        GradientReversal(bad)
    layer = GradientReversal()
    with pytest.raises(ValueError, match="GradientReversal: lambda_ must be a finite number"):
        layer.lambda_ = bad


def test_module_rejects_an_unknown_backend_when_built():
    with pytest.raises(ValueError, match=r"GradientReversal: backend must be None, 'auto' or one of .*, got 'nope'"):
        GradientReversal(backend="nope")


@pytest.mark.parametrize(
    "x, lambda_, error, message",
    [
        ([1.0, 2.0], 1.0, TypeError, r"x must be a torch.Tensor, got list"),
        (torch.ones(3, dtype=torch.int64), 1.0, TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
        (torch.ones(3), torch.ones(2), ValueError, r"lambda_ must be a Python number or a 0-dim floating-point tensor"),
        (torch.ones(3), torch.tensor(1), ValueError, r"0-dim floating-point tensor, got .* dtype torch.int64"),
        (torch.ones(3), "1.0", TypeError, r"lambda_ must be a Python number or a 0-dim tensor, got str"),
        (torch.ones(3), True, TypeError, r"got bool"),
        (torch.ones(3), torch.tensor(1.0, device="meta"), ValueError, r"lambda_ is on meta but x is on cpu"),
    ],
)
def test_bad_input_is_named(x, lambda_, error, message):
    with pytest.raises(error, match=message):
        grad_reverse(x, lambda_)


# ---------------------------------------------------------------- DANN schedule


def test_dann_lambda_values():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1, rel=1e-15)
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1, rel=1e-15)
    assert dann_lambda(1.0, gamma=4.0) == pytest.approx(2 / (1 + math.exp(-4)) - 1, rel=1e-15)


def test_scheduler_updates_every_reversal_monotonically():
    model = torch.nn.ModuleDict(
        {"a": GradientReversal(), "b": torch.nn.Sequential(torch.nn.ReLU(), GradientReversal())}
    )
    extra = GradientReversal()
    scheduler = DANNLambdaScheduler([model, extra], total_steps=10)
    layers = [model["a"], model["b"][1], extra]
    assert scheduler.layers == layers and all(layer.lambda_ == 0.0 for layer in layers)
    values = [scheduler.step() for _ in range(12)]
    assert all(b > a for a, b in zip(values[:10], values[1:10]))
    assert values[4] == pytest.approx(dann_lambda(0.5)) and values[9] == pytest.approx(dann_lambda(1.0))
    assert values[10] == values[11] == values[9]  # past total_steps p stays at 1
    assert all(layer.lambda_ == pytest.approx(values[-1]) for layer in layers)


def test_scheduler_state_round_trip():
    layer = GradientReversal()
    scheduler = DANNLambdaScheduler(layer, total_steps=8, gamma=5.0)
    for _ in range(3):
        scheduler.step()
    resumed = DANNLambdaScheduler(layer, total_steps=1)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.step() == scheduler.step() and layer.lambda_ == pytest.approx(dann_lambda(0.5, 5.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total_steps=0), r"total_steps must be a positive integer, got 0"),
        (dict(total_steps=-5), r"total_steps must be a positive integer"),
        (dict(total_steps=2.5), r"total_steps must be a positive integer"),
        (dict(total_steps=True), r"total_steps must be a positive integer"),
        (dict(total_steps=10, gamma=-1.0), r"gamma must be positive, got -1.0"),
        (dict(total_steps=10, gamma=0), r"gamma must be positive"),
        (dict(total_steps=10, gamma=float("nan")), r"gamma must be a finite number"),
    ],
)
def test_scheduler_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"DANNLambdaScheduler: {message}"):
        DANNLambdaScheduler(GradientReversal(), **kwargs)


def test_scheduler_needs_a_reversal_layer_and_dann_lambda_checks_range():
    with pytest.raises(ValueError, match="no GradientReversal module found"):
        DANNLambdaScheduler(torch.nn.Linear(2, 2), total_steps=3)
    with pytest.raises(ValueError, match=r"p \(training progress, step/total_steps\) must be in \[0, 1\], got 1.5"):
        dann_lambda(1.5)
    with pytest.raises(ValueError, match="gamma must be positive"):
        dann_lambda(0.5, gamma=-10)


# ---------------------------------------------------------------- GPU: λ read from device memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", [name for name in ("triton", "cuda") if AVAILABLE[name].available])
def test_device_lambda_on_gpu(backend):
    grad = randn(3, 1001)
    lambda_ = torch.tensor(0.4, dtype=torch.float64, device="cuda")
    out = torch.ops.lowrank.grad_reverse_backward(grad, lambda_, backend)
    assert_reversed(out, grad, 0.4, torch.float64)
    layer = GradientReversal(0.4, backend=backend).cuda()
    x = randn(2, 1001).requires_grad_()
    (layer(x) * 2).sum().backward()
    assert_reversed(x.grad, torch.full_like(x, 2.0), 0.4, torch.float64)
