"""LoRA layers in lowrank.nn against float64 references: outputs, gradients, merge, init, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank.nn import LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALinear

BACKEND = "torch"


def randomize_lora(layer, std=0.2):
    """Nonzero A and B, so the LoRA path actually contributes."""
    with torch.no_grad():
        layer.lora_A.normal_(std=std)
        layer.lora_B.normal_(std=std)
    return layer


def hf_conv1d():
    return pytest.importorskip("transformers.pytorch_utils").Conv1D


def make_layer(kind, dtype=torch.float32):
    """A randomized LoRA layer of each kind and a matching input."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = LoRALinear(12, 10, r=4, alpha=8, dtype=dtype, backend=BACKEND)
        x = torch.randn(2, 3, 12, dtype=dtype)
    elif kind == "conv1d":
        layer = LoRAConv1D(10, 12, r=4, alpha=8, dtype=dtype, backend=BACKEND)
        x = torch.randn(2, 3, 12, dtype=dtype)
    elif kind == "embedding":
        layer = LoRAEmbedding(20, 6, r=4, alpha=8, padding_idx=0, dtype=dtype)
        x = torch.randint(0, 20, (2, 5))
    else:
        layer = LoRAConv2d(3, 5, 3, r=4, alpha=8, stride=2, padding=1, dilation=2, dtype=dtype)
        x = torch.randn(2, 3, 9, 9, dtype=dtype)
    return randomize_lora(layer), x


def reference(kind, layer, x):
    """float64 forward from the layer's parameters, written from the LoRA formula."""
    p = {name: t.detach().double().requires_grad_() for name, t in layer.named_parameters()}
    s = layer.alpha / layer.r
    if kind == "linear":
        xd = x.detach().double().requires_grad_()
        out = xd @ p["weight"].t() + p["bias"] + s * (xd @ p["lora_A"].t()) @ p["lora_B"].t()
    elif kind == "conv1d":
        xd = x.detach().double().requires_grad_()
        out = xd @ p["weight"] + p["bias"] + s * (xd @ p["lora_A"].t()) @ p["lora_B"].t()
    elif kind == "embedding":
        xd = None
        # padding_idx: no gradient flows to the padding row of the weight or column of A.
        def lookup(table):
            return F.embedding(x, table, padding_idx=layer.padding_idx)

        out = lookup(p["weight"]) + s * lookup(p["lora_A"].t()) @ p["lora_B"].t()
    else:
        xd = x.detach().double().requires_grad_()
        geometry = {"stride": 2, "padding": 1, "dilation": 2}
        out = F.conv2d(xd, p["weight"], p["bias"], **geometry)
        out = out + s * F.conv2d(F.conv2d(xd, p["lora_A"], **geometry), p["lora_B"])
    return out, xd, p


KINDS = ["linear", "conv1d", "embedding", "conv2d"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_gradients_match_float64_reference(kind):
    if kind == "conv1d":
        hf_conv1d()
    layer, x = make_layer(kind)
    for param in layer.parameters():
        param.requires_grad_(True)  # check the base weight's gradient too
    if x.is_floating_point():
        x.requires_grad_(True)
    out = layer(x)
    ref, x_ref, ref_params = reference(kind, layer, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(ref)
    out.backward(grad_out.float())
    ref.backward(grad_out)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad.double(), ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    if x_ref is not None:
        torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5)
    if kind == "embedding":
        assert (x == 0).any() and torch.count_nonzero(layer.lora_A.grad[:, 0]) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_starts_as_base_layer_with_frozen_weight(kind):
    if kind == "conv1d":
        hf_conv1d()
    torch.manual_seed(0)
    layer, x = make_layer(kind)
    layer.reset_lora_parameters()
    assert not layer.weight.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    if kind == "embedding":  # PEFT: A zeros, B normal
        assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0
        base = F.embedding(x, layer.weight, layer.padding_idx)
    else:  # PEFT: A kaiming-uniform(a=sqrt(5)), B zeros
        fan_in = layer.lora_A[0].numel()
        assert layer.lora_A.abs().max() <= 1 / math.sqrt(fan_in)
        assert torch.count_nonzero(layer.lora_B) == 0
        if kind == "conv2d":
            base = F.conv2d(x, layer.weight, layer.bias, stride=2, padding=1, dilation=2)
        elif kind == "conv1d":
            base = x @ layer.weight + layer.bias
        else:
            base = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=1e-6)


def test_state_dict_keys_and_shapes():
    assert {k: tuple(v.shape) for k, v in LoRALinear(12, 10, r=4).state_dict().items()} == {
        "weight": (10, 12), "bias": (10,), "lora_A": (4, 12), "lora_B": (10, 4),
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in LoRAEmbedding(20, 6, r=4).state_dict().items()} == {
        "weight": (20, 6), "lora_A": (4, 20), "lora_B": (6, 4),
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in LoRAConv2d(3, 5, (3, 2), r=4, bias=False).state_dict().items()} == {
        "weight": (5, 3, 3, 2), "lora_A": (4, 3, 3, 2), "lora_B": (5, 4, 1, 1),
    }  # fmt: skip
    assert list(LoRALinear(12, 10, r=4, bias=False).state_dict()) == ["weight", "lora_A", "lora_B"]


def test_conv1d_keeps_hf_keys_and_uses_a_view():
    Conv1D = hf_conv1d()
    base = Conv1D(10, 12)
    layer = LoRAConv1D.from_conv1d(base, r=4, backend=BACKEND)
    assert list(layer.state_dict()) == list(base.state_dict()) + ["lora_A", "lora_B"]
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.nf, layer.nx) == (10, 12)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make_base, wrap",
    [
        (lambda dtype: nn.Linear(6, 4, dtype=dtype), lambda b: LoRALinear.from_linear(b, r=2, backend=BACKEND)),
        (lambda dtype: nn.Embedding(9, 4, dtype=dtype), lambda b: LoRAEmbedding.from_embedding(b, r=2)),
        (lambda dtype: nn.Conv2d(3, 4, 3, dtype=dtype), lambda b: LoRAConv2d.from_conv2d(b, r=2)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_base_shares_parameters_and_places_lora_like_base(make_base, wrap, dtype):
    base = make_base(dtype)
    layer = wrap(base)
    assert layer.weight is base.weight
    assert getattr(layer, "bias", None) is getattr(base, "bias", None)
    assert not base.weight.requires_grad  # the shared Parameter is frozen, as in PEFT
    for lora in (layer.lora_A, layer.lora_B):
        assert lora.dtype == dtype and lora.device == base.weight.device and lora.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_merged_forward_equals_unmerged(kind):
    if kind == "conv1d":
        hf_conv1d()
    layer, x = make_layer(kind)
    layer.eval()
    expected = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()  # merging twice is a no-op
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_in_bfloat16_is_within_bfloat16_tolerance():
    layer, x = make_layer("linear", dtype=torch.bfloat16)
    expected = layer(x).float()
    layer.merge()
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_100_merge_unmerge_cycles_do_not_drift(kind):
    if kind == "conv1d":
        hf_conv1d()
    layer, _ = make_layer(kind)
    original = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    after_one = layer.weight.detach().clone()
    for _ in range(99):
        layer.merge()
        layer.unmerge()
    # The delta is recomputed identically each time, so the weight stops moving after one cycle...
    assert torch.equal(layer.weight, after_one)
    # ...and that cycle moved it by at most a rounding of the merged weight.
    merged_magnitude = (original.double() + layer.delta_weight().double()).abs().max()
    assert (after_one - original).abs().max() <= 2 * torch.finfo(torch.float32).eps * merged_magnitude


def test_dropout_only_in_training():
    layer, x = make_layer("linear")
    layer.dropout = 0.5
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # a fresh mask per call
    layer.eval()
    layer_no_dropout, _ = make_layer("linear")
    torch.testing.assert_close(layer(x), layer_no_dropout(x))


def test_conv2d_dropout_only_in_training():
    layer, x = make_layer("conv2d")
    expected = layer(x)
    layer.dropout = 0.5
    layer.train()
    assert not torch.allclose(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r \\(LoRA rank\\) must be a positive integer"),
        ({"r": -2}, "r \\(LoRA rank\\) must be a positive integer"),
        ({"r": 2.5}, "r \\(LoRA rank\\) must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive"),
        ({"alpha": -1.0}, "alpha must be a positive"),
        ({"dropout": 1.0}, "dropout must be a probability in \\[0, 1\\)"),
        ({"dropout": -0.1}, "dropout must be a probability in \\[0, 1\\)"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match="LoRALinear: " + match):
        LoRALinear(4, 4, **kwargs)
    with pytest.raises(ValueError, match="LoRALinear: " + match):
        LoRALinear.from_linear(nn.Linear(4, 4), **kwargs)
    if "dropout" not in kwargs:
        with pytest.raises(ValueError, match="LoRAEmbedding: " + match):
            LoRAEmbedding(4, 4, **kwargs)


def test_wrong_base_type_raises():
    with pytest.raises(TypeError, match="LoRALinear.from_linear: expected a torch.nn.Linear, got Conv2d"):
        LoRALinear.from_linear(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="LoRAConv2d.from_conv2d: expected a torch.nn.Conv2d, got Linear"):
        LoRAConv2d.from_conv2d(nn.Linear(1, 1))
    with pytest.raises(TypeError, match="LoRAEmbedding.from_embedding: expected a torch.nn.Embedding"):
        LoRAEmbedding.from_embedding(nn.Linear(1, 1))
    with pytest.raises(TypeError, match="LoRAConv1D.from_conv1d: expected a transformers Conv1D, got Linear"):
        LoRAConv1D.from_conv1d(nn.Linear(1, 1))
    with pytest.raises(TypeError, match="already has LoRA"):
        LoRALinear.from_linear(LoRALinear(2, 2))


def test_grouped_conv2d_is_refused():
    with pytest.raises(ValueError, match="LoRAConv2d: only groups=1"):
        LoRAConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2))
