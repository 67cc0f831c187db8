"""Fixtures of the op tests: an op of lowrank.ops through one backend against its float64 reference
(`reference_check`), and the awkward shapes (`linear_shape`) and strided layouts (`strided_layout`) of a
LoRA-style op's tensors."""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grads_of(y, inputs, grad_y):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(y, wanted, grad_y)


@dataclass(frozen=True)
class ReferenceCheck:
    """op(*inputs, scaling, dropout_p, backend=...) against reference(*inputs, scaling, dropout_p,
    seed) in float64, on the same inputs (None for an absent bias) and the same dropout seed;
    dropout_p is a rate, or a list of rates (one per adapter: multi_lora_linear)."""

    op: Callable
    reference: Callable
    tolerance: dict  # by dtype, relative to the reference's largest entry (at least 1)
    grad_names: tuple[str, ...]  # of the inputs, in their order

    def run(self, backend, inputs, scaling=0.7, dropout_p=0.0, grad_y=None):
        """((y, grads), (y_ref, grads_ref)); grads: of the inputs that require grad, for grad_y
        (default: random)."""
        torch.manual_seed(1234)
        y = self.op(*inputs, scaling, dropout_p, backend=backend)
        torch.manual_seed(1234)  # the seed the op drew
        rates = dropout_p if isinstance(dropout_p, list) else [dropout_p]
        seed = torch.randint(0, 2**31 - 1, (), device=DEVICE) if any(p > 0 for p in rates) else None
        ref_inputs = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
        y_ref = self.reference(*ref_inputs, scaling, dropout_p, seed)
        if grad_y is None:
            grad_y = torch.randn_like(y_ref)
        return (y, _grads_of(y, inputs, grad_y.to(y.dtype))), (y_ref, _grads_of(y_ref, ref_inputs, grad_y))

    def assert_close(self, ours, ref, dtype, what=""):
        tol = self.tolerance[dtype]
        scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
        assert ours.shape == ref.shape, what
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")

    def named_grads(self, inputs, grads):
        """(name, gradient) of each input that requires grad."""
        names = [name for name, t in zip(self.grad_names, inputs) if t is not None and t.requires_grad]
        return list(zip(names, grads))

    def check(self, backend, inputs, dtype, **kwargs):
        """Output and gradients of the op through `backend` close to the reference's, in `dtype`."""
        (y, grads), (y_ref, grads_ref) = self.run(backend, inputs, **kwargs)
        assert y.dtype == dtype
        self.assert_close(y, y_ref, dtype, "y")
        for (name, grad), grad_ref in zip(self.named_grads(inputs, grads), grads_ref):
            assert grad.dtype == dtype, name
            self.assert_close(grad, grad_ref, dtype, name)


@pytest.fixture(scope="session")
def reference_check():
    """ReferenceCheck(op, reference, tolerance, grad_names), for a test module's own fixture."""
    return ReferenceCheck


# (lead shape of x, K, N, r): block-size-unfriendly sizes, M=1, M=0, 3-D inputs, r=1, rows above K and N
# (the CPU backends merge the weight there), more rows than Triton's one-launch inference path (256)
# and a rank above K and N.
LINEAR_SHAPES = [
    ((1,), 5, 7, 3),
    ((0,), 8, 6, 4),
    ((37,), 70, 45, 16),
    ((65,), 33, 129, 1),
    ((2, 3), 17, 19, 5),
    ((70,), 33, 45, 5),
    ((300,), 20, 18, 5),
    ((4,), 16, 16, 70),
]


@pytest.fixture(params=LINEAR_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
def linear_shape(request):
    """Each awkward (lead shape of x, K, N, r) of a LoRA-style op (lora_linear, dora_linear) in turn."""
    return request.param


def _relayout(t, how):
    """The same values as t in a non-contiguous layout."""
    if how == "transposed":
        return t.t().contiguous().t()
    wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)  # every other column
    wide[:, ::2] = t
    return wide[:, ::2]


@pytest.fixture(params=["x_transposed", "x_strided", "w_transposed", "lora_transposed", "bias_strided",
                        "dy_expanded", "dy_row_broadcast"])
def strided_layout(request):
    """Each layout a LoRA-style op must read in place, in turn: strided_layout(x, weight, bias,
    lora_A, lora_B, dy) gives the same values with the layout's tensors non-contiguous (x, W as
    GPT-2's Conv1D passes it, A and B, the bias) or dy expanded (as y.sum().backward() hands it
    over, or one row broadcast)."""
    layout = request.param

    def apply(x, weight, bias, lora_A, lora_B, dy):
        if layout == "x_transposed":
            x = _relayout(x, "transposed")
        elif layout == "x_strided":
            x = _relayout(x, "strided")
        elif layout == "w_transposed":  # weight.t() of a [K, N] parameter
            weight = _relayout(weight, "transposed")
        elif layout == "lora_transposed":
            lora_A, lora_B = _relayout(lora_A, "transposed"), _relayout(lora_B, "transposed")
        elif layout == "bias_strided":
            bias = _relayout(bias[None], "strided")[0]
        elif layout == "dy_expanded":
            dy = torch.ones((), dtype=dy.dtype, device=dy.device).expand(dy.shape)
        else:
            dy = dy[:1].expand(dy.shape)
        assert layout.startswith("dy") or not all(t.is_contiguous() for t in (x, weight, bias, lora_A, lora_B))
        return x, weight, bias, lora_A, lora_B, dy

    return apply
