"""LoRA layers in lowrank.nn against float64 references: outputs, gradients, merge, init, errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.nn import LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALinear
from lowrank.ops import dora_linear, dora_linear_reference, lora_linear

BACKEND = "torch"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the `backend` fixture's backends run


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
    layer.reset_lora_parameters("default")
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
    merged_magnitude = (original.double() + layer.delta_weight("default").double()).abs().max()
    assert (after_one - original).abs().max() <= 2 * torch.finfo(torch.float32).eps * merged_magnitude


def test_dropout_only_in_training():
    layer, x = make_layer("linear")
    layer.lora_adapters["default"].dropout = 0.5
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # a fresh mask per call
    layer.eval()
    layer_no_dropout, _ = make_layer("linear")
    torch.testing.assert_close(layer(x), layer_no_dropout(x))


def test_conv2d_dropout_only_in_training():
    layer, x = make_layer("conv2d")
    expected = layer(x)
    layer.lora_adapters["default"].dropout = 0.5
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


# ------------------------------------------------------------------ named adapters


def test_named_adapters_keep_the_default_keys_and_add_suffixed_ones():
    layer = LoRALinear(12, 10, r=4)
    layer.add_adapter("other", 2, 4)
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B", "lora_A_other", "lora_B_other"]
    assert layer.lora_adapters["other"].r == 2 and layer.active_adapters == ["default"]
    assert not layer.lora_A_other.requires_grad  # added inactive and frozen, as PEFT's add_adapter
    with pytest.raises(ValueError, match=r"adapters \['default', 'other'\]; read their settings"):
        layer.r
    with pytest.raises(ValueError, match="already has LoRA adapter 'other'"):
        layer.add_adapter("other", 2, 4)
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        layer.add_adapter("a.b", 2, 4)


def multi_adapter_layer(kind, dropouts=(0.0, 0.0)):
    """A layer with adapters "default" (r=4, alpha=8) and "other" (r=3, alpha=6, rsLoRA), both active."""
    layer, x = make_layer(kind, dtype=torch.float64)
    layer.lora_adapters["default"].dropout = dropouts[0]
    layer.add_adapter("other", 3, 6, dropouts[1], use_rslora=True)
    with torch.no_grad():
        layer.lora_A_other.normal_(std=0.2)
        layer.lora_B_other.normal_(std=0.2)
    layer.set_adapter(["default", "other"])
    return layer, x


def multi_adapter_reference(kind, layer, x, dropped_x=None):
    """float64 forward: the base layer plus both adapters' terms, written from the formula."""
    geometry = {"stride": 2, "padding": 1, "dilation": 2}
    if kind == "linear":
        out = F.linear(x, layer.weight, layer.bias)
    elif kind == "conv1d":
        out = x @ layer.weight + layer.bias
    elif kind == "embedding":
        out = F.embedding(x, layer.weight, layer.padding_idx)
    else:
        out = F.conv2d(x, layer.weight, layer.bias, **geometry)
    for name, scaling in (("default", 8 / 4), ("other", 6 / math.sqrt(3))):
        lora_A, lora_B = layer.lora_parameters(name)
        x_lora = dropped_x if (name == "other" and dropped_x is not None) else x
        if kind == "embedding":
            out = out + scaling * F.embedding(x, lora_A.t(), layer.padding_idx) @ lora_B.t()
        elif kind == "conv2d":
            out = out + scaling * F.conv2d(F.conv2d(x_lora, lora_A, **geometry), lora_B)
        else:
            out = out + scaling * (x_lora @ lora_A.t()) @ lora_B.t()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_several_active_adapters_add_up_with_their_own_scaling(kind, monkeypatch):
    if kind == "conv1d":
        hf_conv1d()
    layer, x = multi_adapter_layer(kind)
    if x.is_floating_point():
        x = x.double().requires_grad_()
    calls = []
    monkeypatch.setattr("lowrank.nn.lora.lora_linear", lambda *a, **k: calls.append(a) or lora_linear(*a, **k))
    out = layer(x)
    expected = multi_adapter_reference(kind, layer, x)
    torch.testing.assert_close(out, expected)
    params = [p for name in ("default", "other") for p in layer.lora_parameters(name)]
    grads = torch.autograd.grad(out.square().sum(), params)
    grads_expected = torch.autograd.grad(expected.square().sum(), params)
    for grad, grad_expected in zip(grads, grads_expected):
        torch.testing.assert_close(grad, grad_expected)
    if kind in ("linear", "conv1d"):  # one fused call of rank 4 + 3, scaling folded into B
        assert len(calls) == 1 and calls[0][3].shape[0] == 7 and calls[0][5] == 1.0


def test_several_adapters_with_different_dropouts_in_training(monkeypatch):
    layer, x = multi_adapter_layer("linear", dropouts=(0.0, 0.5))
    layer.train()
    calls = []
    monkeypatch.setattr("lowrank.nn.lora.lora_linear", lambda *a, **k: calls.append(a) or lora_linear(*a, **k))
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)  # the second rate's term draws its mask from torch's generator, after the fused call
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, multi_adapter_reference("linear", layer, x, dropped_x=dropped))
    assert len(calls) == 1 and calls[0][3].shape[0] == 4  # the fused call runs the dropout-free adapter


def test_inactive_adapter_does_nothing_and_set_adapter_freezes_it():
    layer, x = multi_adapter_layer("linear")
    layer.set_adapter("other")
    assert layer.active_adapters == ["other"]
    assert not layer.lora_A.requires_grad and layer.lora_A_other.requires_grad
    lora_A, lora_B = layer.lora_parameters("other")
    expected = F.linear(x, layer.weight, layer.bias) + 6 / math.sqrt(3) * (x @ lora_A.t()) @ lora_B.t()
    torch.testing.assert_close(layer(x), expected)
    layer.delete_adapter("other")
    assert layer.active_adapters == [] and list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("kind", KINDS)
def test_merging_several_adapters_and_unmerging(kind):
    if kind == "conv1d":
        hf_conv1d()
    layer, x = multi_adapter_layer(kind)
    expected = layer(x)
    original = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged_adapters == ["default", "other"]
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original)


# ------------------------------------------------------------------ merged state in the state_dict (issue 17, class 7)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_state_dict_loaded_into_unmerged_layer_is_not_applied_twice(kind, tmp_path):
    if kind == "conv1d":
        hf_conv1d()
    source, x = make_layer(kind)
    expected = source(x)
    source.merge()
    # Through a safetensors file, as a Trainer checkpoint or a user's save_file would go.
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "merged.safetensors")
    target, _ = make_layer(kind)
    with torch.no_grad():
        target.lora_B.zero_()  # different values, so the load must bring them
    target.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    torch.testing.assert_close(target(x), expected, rtol=1e-5, atol=1e-5)
    assert target.merged_adapters == ["default"]
    target.unmerge()  # and the merge can be undone, back to the unmerged layer's output
    torch.testing.assert_close(target(x), expected, rtol=1e-5, atol=1e-5)


def test_unmerged_state_dict_loaded_into_merged_layer_unmerges_it():
    source, x = make_layer("linear")
    expected = source(x)
    target, _ = make_layer("linear")
    target.merge()
    target.load_state_dict(source.state_dict())
    assert not target.merged
    torch.testing.assert_close(target(x), expected)


def test_lora_tensors_alone_into_a_merged_layer_are_refused():
    source, _ = make_layer("linear")
    target, _ = make_layer("linear")
    target.merge()
    with pytest.raises(ValueError, match=r"adapters \['default'\] merged into its weight.*not weight; unmerge first"):
        target.load_state_dict({"lora_A": source.lora_A, "lora_B": source.lora_B}, strict=False)


def test_merged_adapter_the_receiving_layer_lacks_is_refused():
    source, _ = multi_adapter_layer("linear")
    source.merge()
    target, _ = make_layer("linear", dtype=torch.float64)
    with pytest.raises(ValueError, match="weight has adapter 'other' merged into it .*no such adapter"):
        target.load_state_dict(source.state_dict(), strict=False)


# ------------------------------------------------------------------ rsLoRA and PiSSA


def test_rslora_scaling():
    layer = LoRALinear(12, 10, r=16, alpha=8, use_rslora=True)
    assert layer.scaling == 8 / 4 and LoRALinear(12, 10, r=16, alpha=8).scaling == 0.5


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_pissa_init_keeps_the_output_and_leaves_the_residual(kind, init):
    if kind == "conv1d":
        Conv1D = hf_conv1d()
        base = Conv1D(10, 12)
        layer = LoRAConv1D.from_conv1d(copy.deepcopy(base), r=3, alpha=6, init_lora_weights=init)
        weight = base.weight.t()
    else:
        base = nn.Linear(12, 10)
        layer = LoRALinear.from_linear(copy.deepcopy(base), r=3, alpha=6, init_lora_weights=init)
        weight = base.weight
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)
    residual = layer.weight.t() if kind == "conv1d" else layer.weight
    torch.testing.assert_close(residual + 2.0 * layer.lora_B @ layer.lora_A, weight, rtol=1e-5, atol=1e-5)
    if init == "pissa":  # A and B hold the top-3 singular directions: the residual has the rest
        singular = torch.linalg.svdvals(weight.detach())
        torch.testing.assert_close(torch.linalg.svdvals(residual.detach())[:3], singular[3:6], rtol=1e-4, atol=1e-5)
    initial_A, initial_B = layer.pissa_initial("default")
    assert torch.equal(initial_A, layer.lora_A) and torch.equal(initial_B, layer.lora_B)


def test_pissa_is_refused_where_it_is_not_implemented():
    with pytest.raises(ValueError, match="PiSSA init is implemented for Linear and Conv1D layers only"):
        LoRAEmbedding(10, 4, r=2, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="PiSSA needs r <= min\\(weight shape\\) = 4"):
        LoRALinear(4, 6, r=5, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="init_lora_weights must be True, 'pissa' or 'pissa_niter_<K>'"):
        LoRALinear(4, 6, r=2, init_lora_weights="olora")


def test_several_active_adapters_compile_fullgraph(compiles_like_eager):
    layer, x = multi_adapter_layer("linear")
    layer.float()
    compiles_like_eager(lambda x: layer(x).square().sum(), x.float(), [layer.lora_A, layer.lora_B_other])


# ------------------------------------------------------------------ DoRA


def dora_layer(kind, backend=BACKEND, dtype=torch.float64):
    """A layer whose active adapter "dora" (r=3, alpha=6) has nonzero A and B and a magnitude away from the
    weight norm; its plain adapter "default" (r=4, alpha=8) is inactive."""
    if kind == "conv1d":
        hf_conv1d()
    layer, x = make_layer(kind, dtype=dtype)
    layer.backend = backend
    layer.add_adapter("dora", 3, 6, use_dora=True)
    with torch.no_grad():
        layer.lora_A_dora.normal_(std=0.2)
        layer.lora_B_dora.normal_(std=0.2)
        layer.lora_magnitude_vector_dora.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude_vector_dora))
    layer.set_adapter("dora")
    return layer, x


def dora_formula(layer, x):
    """DoRA as PEFT writes it, W + s·B·A formed and its row norm detached (adapter "dora": s = 6 / 3)."""
    weight = layer._weight_out_in()
    lora_A, lora_B = layer.lora_parameters("dora")
    norm = torch.linalg.vector_norm(weight + 2.0 * lora_B @ lora_A, dim=1).detach()
    magnitude = layer.lora_magnitude_vector_dora
    return (magnitude / norm) * (x @ weight.t() + 2.0 * (x @ lora_A.t()) @ lora_B.t()) + layer.bias


def assert_same_gradients(out, expected, params):
    grads = torch.autograd.grad(out.square().sum(), params, retain_graph=True)
    for grad, grad_expected in zip(grads, torch.autograd.grad(expected.square().sum(), params, retain_graph=True)):
        torch.testing.assert_close(grad, grad_expected)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_adapter_matches_the_formula_on_every_backend(kind, backend, monkeypatch):
    layer, x = dora_layer(kind, backend)
    layer, x = layer.to(DEVICE), x.to(DEVICE)
    calls = []
    monkeypatch.setattr("lowrank.nn.lora.dora_linear", lambda *a, **k: calls.append(k) or dora_linear(*a, **k))
    x = x.requires_grad_()
    out, expected = layer(x), dora_formula(layer, x)
    torch.testing.assert_close(out, expected)
    params = [x, *layer.adapter_parameters("dora")]
    assert len(params) == 4 and all(p.requires_grad for p in params)
    assert_same_gradients(out, expected, params)
    layer(x)
    assert len(calls) == 2 and calls[0]["backend"] == backend
    assert calls[1]["weight_norm_sq"] is calls[0]["weight_norm_sq"]  # the cached ‖W‖², not recomputed


def test_dora_weight_norm_is_recomputed_after_the_weight_changes():
    layer, x = dora_layer("linear")
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(1.5)  # in place, as an optimizer step or load_state_dict
    torch.testing.assert_close(layer(x), dora_formula(layer, x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_starts_as_the_base_layer_with_peft_key_names(kind):
    if kind == "conv1d":
        base = hf_conv1d()(10, 12)
        layer = LoRAConv1D.from_conv1d(copy.deepcopy(base), r=4, use_dora=True, adapter_name="d")
        weight = base.weight.t()
    else:
        base = nn.Linear(12, 10)
        layer = LoRALinear.from_linear(copy.deepcopy(base), r=4, use_dora=True, adapter_name="d")
        weight = base.weight
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A_d", "lora_B_d", "lora_magnitude_vector_d"]
    assert layer.lora_magnitude_vector_d.requires_grad and not layer.weight.requires_grad
    torch.testing.assert_close(layer.lora_magnitude_vector_d, torch.linalg.vector_norm(weight, dim=1))
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), base(x))
    assert "dora" in repr(layer)


def test_dora_dropout_only_in_training():
    layer, x = dora_layer("linear")
    layer.lora_adapters["dora"].dropout = 0.3
    layer.train()
    torch.manual_seed(4)
    out = layer(x)
    torch.manual_seed(4)
    seed = torch.randint(0, 2**31 - 1, ())  # the seed dora_linear draws
    inputs = (layer.weight, layer.bias, *layer.lora_parameters("dora"), layer.lora_magnitude_vector_dora, 2.0)
    x2d = x.reshape(-1, 12)
    torch.testing.assert_close(out.reshape(-1, 10), dora_linear_reference(x2d, *inputs, 0.3, seed))
    layer.eval()
    torch.testing.assert_close(layer(x), dora_formula(layer, x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_merge_is_exact_and_unmerge_restores_the_weight(kind):
    layer, x = dora_layer(kind)
    original = layer.weight.detach().clone()
    expected = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["dora"] and "lora_dora_scale_dora" in layer.state_dict()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=1e-12, atol=1e-12)
    assert "lora_dora_scale_dora" not in layer.state_dict()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_dora_unmerge_in_bfloat16_is_within_one_rounding():
    """Merge and unmerge compute in fp32: W' = g ⊙ (W + s·B·A) rounded once to bf16, W = W'/g − s·B·A rounded once."""
    layer, _ = dora_layer("linear", dtype=torch.bfloat16)
    original = layer.weight.detach().double()
    delta = 2.0 * layer.lora_B_dora.double() @ layer.lora_A_dora.double()
    largest = torch.stack([original.abs(), delta.abs(), (original + delta).abs()]).amax(0)
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(largest)))
    layer.merge()
    layer.unmerge()
    assert ((layer.weight.double() - original).abs() <= ulp).all()


def test_dora_beside_a_plain_adapter_adds_the_plain_term_after_it(monkeypatch):
    layer, x = dora_layer("linear")
    layer.set_adapter(["default", "dora"])  # the order does not matter: DoRA first, the plain term after it
    assert layer.lora_A.requires_grad and layer.lora_magnitude_vector_dora.requires_grad
    x = x.requires_grad_()
    out = layer(x)
    expected = dora_formula(layer, x) + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, [x, *layer.adapter_parameters("dora"), *layer.adapter_parameters("default")])
    layer.merge()
    assert layer.merged_adapters == ["dora", "default"]
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    layer.set_adapter("default")
    assert not layer.lora_magnitude_vector_dora.requires_grad


def test_dora_merges_first_onto_the_unmerged_weight():
    """A plain adapter merged before the DoRA adapter is taken out and put back after it."""
    layer, x = dora_layer("linear")
    layer.set_adapter(["dora", "default"])
    original, expected = layer.weight.detach().clone(), layer(x)
    with pytest.raises(ValueError, match="merge the running DoRA adapter 'dora' too, or first"):
        layer.merge(["default"])
    layer.set_adapter("default")
    layer.merge()
    layer.merge(["dora"])
    assert layer.merged_adapters == ["dora", "default"]
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original)


def test_one_dora_adapter_active_or_merged_at_a_time():
    layer, x = dora_layer("linear")
    layer.add_adapter("dora2", 2, 2, use_dora=True)
    with pytest.raises(ValueError, match=r"one DoRA adapter can be active at a time, got \['dora', 'dora2'\]"):
        layer.set_adapter(["dora", "dora2"])
    assert layer.active_adapters == ["dora"]
    with pytest.raises(ValueError, match=r"one DoRA adapter can be merged at a time, got \['dora', 'dora2'\]"):
        layer.merge(["dora", "dora2"])
    layer.merge()
    with pytest.raises(ValueError, match="unmerge before adding a DoRA adapter"):
        layer.add_adapter("dora3", 2, 2, use_dora=True)


def test_merged_dora_state_dict_brings_its_scale(tmp_path):
    source, x = dora_layer("linear")
    expected = source(x)
    source.merge()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "merged.safetensors")
    target, _ = dora_layer("linear")
    with torch.no_grad():
        target.lora_magnitude_vector_dora.mul_(2.0)  # different values, so the load must bring them
    target.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    assert target.merged_adapters == ["dora"]
    torch.testing.assert_close(target(x), expected)
    target.unmerge()  # needs the merge's g, which came with the state_dict
    torch.testing.assert_close(target(x), expected)
    target.merge()
    target.load_state_dict(dora_layer("linear")[0].state_dict())  # an unmerged state_dict: unmerged, g dropped
    assert not target.merged and "lora_dora_scale_dora" not in target.state_dict()
    torch.testing.assert_close(target(x), expected)


def test_dora_magnitude_alone_into_a_merged_layer_is_refused():
    layer, _ = dora_layer("linear")
    layer.merge()
    with pytest.raises(ValueError, match=r"adapters \['dora'\] merged into its weight.*\(DoRA: magnitude\)"):
        layer.load_state_dict({"lora_magnitude_vector_dora": layer.lora_magnitude_vector_dora * 2}, strict=False)
    source, _ = dora_layer("linear")
    source.merge()
    state = {k: v for k, v in source.state_dict().items() if k != "lora_dora_scale_dora"}
    target, _ = dora_layer("linear")
    with pytest.raises(ValueError, match=r"adapter 'dora' merged into it .*lacks \['lora_dora_scale_dora'\]"):
        target.load_state_dict(state)


def test_dora_is_refused_where_it_is_not_implemented():
    with pytest.raises(ValueError, match="LoRAEmbedding: DoRA is implemented for Linear and Conv1D layers only"):
        LoRAEmbedding(10, 4, r=2, use_dora=True)
    with pytest.raises(ValueError, match="LoRAConv2d: DoRA is implemented for Linear and Conv1D layers only"):
        LoRAConv2d(3, 4, 3, r=2, use_dora=True)
    with pytest.raises(ValueError, match="DoRA and PiSSA adapters cannot share a layer"):
        LoRALinear(6, 6, r=2, use_dora=True, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="DoRA and PiSSA adapters cannot share a layer"):
        LoRALinear(6, 6, r=2, use_dora=True).add_adapter("pissa", 2, 2, init_lora_weights="pissa")
    with pytest.raises(TypeError, match="use_dora must be True or False, got 1"):
        LoRALinear(6, 6, r=2, use_dora=1)


def test_dora_layer_saves_and_copies_after_a_forward(tmp_path):
    layer, x = dora_layer("linear")
    expected = layer(x)  # fills the weight-norm cache, which holds a weakref
    torch.save(layer, tmp_path / "layer.pt")
    torch.testing.assert_close(torch.load(tmp_path / "layer.pt", weights_only=False)(x), expected)
    copied = copy.deepcopy(layer)
    with torch.no_grad():
        copied.weight.mul_(2.0)
    torch.testing.assert_close(copied(x), dora_formula(copied, x))
    torch.testing.assert_close(layer(x), expected)


def test_dora_beside_a_plain_adapter_compiles_fullgraph(compiles_like_eager):
    layer, x = dora_layer("linear", dtype=torch.float32)
    layer.set_adapter(["dora", "default"])
    params = [layer.lora_A, layer.lora_B_dora, layer.lora_magnitude_vector_dora]
    compiles_like_eager(lambda x: layer(x).square().sum(), x, params)
