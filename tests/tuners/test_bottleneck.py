"""lowrank.nn.Adapter and adapter model surgery: placements on tiny BERT / GPT-2 / Llama models and
on the real all-MiniLM-L6-v2, training only the adapters, save/load, errors."""

import copy
import json
import os

import pytest
import torch
from torch import nn

from lowrank import inject_bottleneck, load_bottleneck, mark_only_bottleneck_trainable, save_bottleneck
from lowrank.nn import Adapter
from lowrank.tuners.bottleneck.model import BottleneckConfig, bottleneck_adapters
from lowrank.tuners.bottleneck.save_load import CONFIG_NAME, WEIGHTS_NAME

transformers = pytest.importorskip("transformers")

BACKEND = "torch"
F = torch.nn.functional


def reference64(h, adapter, residual=None):
    """The adapter formula in float64 with plain autograd."""
    residual = adapter.residual if residual is None else residual
    act = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu}[adapter.activation]
    h = h.double()
    delta = adapter.scaling * F.linear(
        act(F.linear(h, adapter.down.weight.double(), adapter.down.bias.double())),
        adapter.up.weight.double(), adapter.up.bias.double(),
    )  # fmt: skip
    return h + delta if residual else delta


def randomize(adapters, std=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters:
            for param in adapter.parameters():
                param.normal_(std=std)


# ------------------------------------------------------------------------------------ the module


@pytest.mark.parametrize("backend", [BACKEND, None])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("residual", [True, False])
def test_module_matches_float64_reference_with_grads(backend, activation, residual):
    adapter = Adapter(24, 5, activation, scaling=0.7, residual=residual, backend=backend)
    randomize([adapter])
    h = torch.randn(2, 7, 24, requires_grad=True)
    h64 = h.detach().double().requires_grad_()
    grad = torch.randn(2, 7, 24)
    out = adapter(h)
    assert out.shape == h.shape and out.dtype == h.dtype
    out.backward(grad)
    params = list(adapter.parameters())
    params64 = [p.detach().double().requires_grad_() for p in params]
    twin = copy.deepcopy(adapter).double()
    for p, p64 in zip(twin.parameters(), params64):
        p.data = p64
    expected = reference64(h64, twin)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
    for p, p64 in zip(params, twin.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-5)


def test_identity_init_is_exact_and_trains():
    adapter = Adapter(16, 4, "gelu", scaling=2.0, backend=BACKEND)
    assert set(adapter.state_dict()) == {"down.weight", "down.bias", "up.weight", "up.bias"}
    assert adapter.down.weight.shape == (4, 16) and adapter.up.weight.shape == (16, 4)
    h = torch.randn(3, 16)
    assert torch.equal(adapter(h), h)
    parallel = Adapter(16, 4, residual=False, backend=BACKEND)
    assert torch.equal(parallel(h), torch.zeros_like(h))
    adapter(h).square().sum().backward()
    assert adapter.up.weight.grad.abs().sum() > 0  # the zero up-projection still learns


def test_houlsby_init_is_near_identity():
    torch.manual_seed(0)
    adapter = Adapter(64, 8, init="houlsby", init_std=1e-2, backend=BACKEND)
    for weight in (adapter.down.weight, adapter.up.weight):
        assert 0 < weight.abs().max() <= 2e-2
    h = torch.randn(5, 64)
    delta = (adapter(h) - h).abs().max()
    assert 0 < delta < 1e-2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=8, bottleneck=16), r"bottleneck \(16\) must not be larger than dim \(8\)"),
        (dict(dim=8, bottleneck=0), "bottleneck must be a positive integer"),
        (dict(dim=8, bottleneck=2, activation="tanh"), "unknown activation 'tanh'"),
        (dict(dim=8, bottleneck=2, init="xavier"), "unknown init 'xavier'"),
        (dict(dim=8, bottleneck=2, scaling=float("nan")), "scaling must be a finite number"),
        (dict(dim=8, bottleneck=2, backend="nope"), r"backend must be None, 'auto' or one of .*, got 'nope'"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=r"Adapter\(dim=8, bottleneck=.*" + message):
        Adapter(**kwargs)


def test_dimension_mismatch_names_module_and_shape():
    message = r"Adapter 'blocks.0.adapter': expected input of shape \[\.\.\., 8\], got \[2, 3, 6\]"
    with pytest.raises(ValueError, match=message):
        Adapter(8, 2, name="blocks.0.adapter")(torch.randn(2, 3, 6))


# ---------------------------------------------------------------------------- tiny HF models

VOCAB, DIM = 40, 16


# Adapter full names (layer 0 of 2) per model and placement.
SITES = {
    ("bert", "houlsby"): {"encoder.layer.0.attention.output.adapter": "post_ln_sequential",
                          "encoder.layer.0.output.adapter": "post_ln_sequential"},
    ("bert", "pfeiffer"): {"encoder.layer.0.output.adapter": "post_ln_sequential"},
    ("bert", "parallel"): {"encoder.layer.0.output.adapter": "post_ln_parallel"},
    ("gpt2", "houlsby"): {"h.0.attn.adapter": "sequential", "h.0.mlp.adapter": "sequential"},
    ("gpt2", "pfeiffer"): {"h.0.mlp.adapter": "sequential"},
    ("gpt2", "parallel"): {"h.0.mlp.adapter": "parallel"},
    ("llama", "houlsby"): {"layers.0.self_attn.adapter": "sequential", "layers.0.mlp.adapter": "sequential"},
    ("llama", "pfeiffer"): {"layers.0.mlp.adapter": "sequential"},
    ("llama", "parallel"): {"layers.0.mlp.adapter": "parallel"},
}  # fmt: skip
CASES = sorted(SITES)


@pytest.fixture(scope="module")
def bases(tiny_hf_model):
    """The tiny BERT (with hidden dropout, to test train mode), GPT-2 and Llama models."""
    extra = {"bert": dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0),
             "gpt2": dict(bos_token_id=0, eos_token_id=0), "llama": {}}
    return {family: tiny_hf_model(family, vocab=VOCAB, dim=DIM, positions=16, **config)
            for family, config in extra.items()}


IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def hidden(model):
    return model(input_ids=IDS).last_hidden_state


def injected(base, placement, **kwargs):
    return inject_bottleneck(copy.deepcopy(base), BottleneckConfig(placement, bottleneck=4, backend=BACKEND, **kwargs))


@pytest.mark.parametrize("model_name, placement", CASES)
def test_placement_sites_and_unchanged_outputs_at_init(bases, model_name, placement):
    base = bases[model_name]
    model = injected(base, placement, activation="gelu")
    layer0 = {name: kind for name, kind in model.adapter_sites.items() if ".0." in name}
    assert layer0 == SITES[model_name, placement]
    assert len(model.adapter_sites) == 2 * len(layer0) == len(bottleneck_adapters(model))
    assert set(base.state_dict()) <= set(model.state_dict())  # the base's keys are untouched
    with torch.no_grad():
        assert torch.equal(hidden(model), hidden(base))
        randomize(bottleneck_adapters(model).values())
        assert not torch.allclose(hidden(model), hidden(base), atol=1e-3)


def _site_semantics(model_name, placement, base, model):
    """(the adapted feed-forward site's output, what the placement says it must be) on random inputs,
    in training mode: both sides draw the same dropout masks, so where dropout sits relative to the
    adapter matters."""
    x = torch.randn(2, 5, DIM)
    if model_name == "bert":
        inner = torch.randn(2, 5, 32)
        site, base_site = model.encoder.layer[0].output, base.encoder.layer[0].output
        args = (inner, x)
    else:
        path = f"{'h' if model_name == 'gpt2' else 'layers'}.0.mlp"
        site, base_site = model.get_submodule(path), base.get_submodule(path)
        args = (x,)
    adapter = site.adapter
    site.train(), base_site.train()
    try:
        torch.manual_seed(3)
        out = site(*args)
        torch.manual_seed(3)
        if model_name == "bert":  # LayerNorm(adapter at dropout(dense(inner)) + x)
            dropped, norm = base_site.dropout(base_site.dense(inner)), base_site.LayerNorm
            if placement == "parallel":
                expected = norm(dropped + x + reference64(x, adapter, residual=False).float())
            else:
                expected = norm(reference64(dropped, adapter).float() + x)
        elif placement == "parallel":
            expected = base_site(x) + reference64(x, adapter).float()
        else:
            expected = reference64(base_site(x), adapter).float()
    finally:
        site.eval(), base_site.eval()
    return out, expected


@pytest.mark.parametrize("model_name, placement", CASES)
def test_feed_forward_site_computes_its_placement(bases, model_name, placement):
    base = bases[model_name]
    model = injected(base, placement, scaling=0.5)
    randomize(bottleneck_adapters(model).values())
    with torch.no_grad():
        out, expected = _site_semantics(model_name, placement, base, model)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_site_wraps_the_attention_output(bases):
    base = bases["gpt2"]
    model = injected(base, "houlsby")
    randomize(bottleneck_adapters(model).values())
    x = torch.randn(2, 5, DIM)
    with torch.no_grad():
        out, expected = model.h[0].attn(x)[0], reference64(base.h[0].attn(x)[0], model.h[0].attn.adapter).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name, placement", CASES)
def test_training_only_adapters_reduces_loss_and_keeps_base_bit_identical(
    bases, trains_only_what_it_should, model_name, placement
):
    model = injected(bases[model_name], placement)
    mark_only_bottleneck_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    params = ("down.weight", "down.bias", "up.weight", "up.bias")
    assert trainable == {f"{adapter}.{param}" for adapter in bottleneck_adapters(model) for param in params}
    target = torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(2))
    trains_only_what_it_should(
        model, lambda: F.mse_loss(hidden(model), target), [p for p in model.parameters() if p.requires_grad],
        steps=5, lr=1e-2, optimizer=torch.optim.Adam,
    )  # fmt: skip


@pytest.mark.parametrize("model_name, placement", [("bert", "houlsby"), ("gpt2", "parallel"), ("llama", "pfeiffer")])
def test_save_load_round_trip(bases, tmp_path, model_name, placement):
    base = bases[model_name]
    model = injected(base, placement, activation="silu", scaling=0.5)
    randomize(bottleneck_adapters(model).values())
    save_bottleneck(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([WEIGHTS_NAME, CONFIG_NAME])
    with torch.no_grad():
        expected = hidden(model)
        fresh = load_bottleneck(copy.deepcopy(base), tmp_path, backend=BACKEND)  # adapters created from the file
        assert fresh.adapter_sites == model.adapter_sites
        assert torch.equal(hidden(fresh), expected)
        again = injected(base, placement, activation="silu")  # existing adapters get the saved weights and scaling
        assert torch.equal(hidden(load_bottleneck(again, tmp_path)), expected)


def test_load_errors(bases, tmp_path):
    model = injected(bases["bert"], "pfeiffer")
    save_bottleneck(model, tmp_path)
    with pytest.raises(ValueError, match=r"encoder.layer.0.output.adapter.down.weight has shape \[4, 16\] in the file, "
                                         r"but the model's Adapter\(dim=16, bottleneck=2\) .* needs \[2, 16\]"):
        pfeiffer = inject_bottleneck(copy.deepcopy(bases["bert"]), dict(placement="pfeiffer", bottleneck=2))
        load_bottleneck(pfeiffer, tmp_path)
    houlsby = injected(bases["bert"], "houlsby")
    with pytest.raises(ValueError, match="the file has no adapter for the model's adapters .*attention.output.adapter"):
        load_bottleneck(houlsby, tmp_path)
    with pytest.raises(ValueError, match="sits at 'encoder.layer.0.output', which the model lacks"):
        load_bottleneck(copy.deepcopy(bases["gpt2"]), tmp_path)
    with pytest.raises(ValueError, match="saved with activation='relu', the model's has 'gelu'"):
        load_bottleneck(injected(bases["bert"], "pfeiffer", activation="gelu"), tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_NAME}"):
        load_bottleneck(model, tmp_path / "nowhere")
    bare = copy.deepcopy(bases["bert"])
    keys_before = set(bare.state_dict())
    os.remove(tmp_path / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS_NAME}"):
        load_bottleneck(bare, tmp_path)
    assert set(bare.state_dict()) == keys_before and not bottleneck_adapters(bare)  # a failed load changes nothing
    with open(tmp_path / CONFIG_NAME) as f:
        assert json.load(f)["adapters"]["encoder.layer.1.output.adapter"]["kind"] == "post_ln_sequential"


# --------------------------------------------------------------- user-named modules and errors


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return F.gelu(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.blocks = nn.ModuleList([FeedForward(12) for _ in range(2)])
        self.tail = nn.Sequential(nn.Linear(12, 12))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.tail(x))


def test_target_modules_sequential_and_parallel():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 6)
    config = dict(target_modules=["inp", "blocks.1.fc"], bottleneck=3, backend=BACKEND)
    model = inject_bottleneck(copy.deepcopy(net), config)
    assert model.adapter_sites == {"inp.adapter": "sequential", "blocks.1.fc.adapter": "sequential"}
    assert torch.equal(model(x), net(x))
    randomize(bottleneck_adapters(model).values())
    with torch.no_grad():
        h = reference64(net.inp(x), model.inp.adapter).float()
        h = F.gelu(reference64(net.blocks[1].fc(net.blocks[0](h)), model.blocks[1].fc.adapter).float())
        torch.testing.assert_close(model(x), net.head(net.tail(h)), rtol=1e-5, atol=1e-5)

    config = dict(placement="parallel", target_modules=r"blocks\.\d", bottleneck=3, dim=12, backend=BACKEND)
    parallel = inject_bottleneck(copy.deepcopy(net), config)
    randomize(bottleneck_adapters(parallel).values())
    with torch.no_grad():
        h = net.inp(x)
        for block, adapter in zip(net.blocks, (parallel.blocks[0].adapter, parallel.blocks[1].adapter)):
            h = block(h) + reference64(h, adapter).float()
        torch.testing.assert_close(parallel(x), net.head(net.tail(h)), rtol=1e-5, atol=1e-5)


def test_deepcopy_hooks_follow_the_copied_adapters():
    net = inject_bottleneck(Net(), dict(target_modules=["inp"], bottleneck=3, backend=BACKEND))
    twin = copy.deepcopy(net)
    x = torch.randn(2, 6)
    before = net(x)
    randomize(bottleneck_adapters(twin).values())
    assert torch.equal(net(x), before) and not torch.allclose(twin(x), before)


def test_torch_compile_fullgraph_through_hooks():
    torch.manual_seed(0)
    model = inject_bottleneck(Net(), dict(target_modules=["inp", "blocks.0.fc"], bottleneck=3, backend=BACKEND))
    config = dict(placement="parallel", target_modules=["blocks.1"], bottleneck=3, dim=12, backend=BACKEND)
    inject_bottleneck(model, config)
    randomize(bottleneck_adapters(model).values())
    x = torch.randn(4, 6)
    expected = model(x)
    # aot_eager traces the hooks and the op's fake/autograd registrations without inductor's slow codegen.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model_maker, config, error, message",
    [
        (Net, dict(), ValueError,
         r"unsupported model: found no BERT-style .* among its module classes \[FeedForward, Linear"),
        (Net, dict(target_modules=["missing"]), ValueError,
         r"target_modules=\['missing'\] matched no module; the model has inp"),
        (Net, dict(target_modules=["inp"], placement="houlsby"), ValueError,
         "placement must be one of .* with target_modules"),
        (Net, dict(placement="everywhere"), ValueError, "placement must be one of .* without target_modules"),
        (Net, dict(target_modules=["inp"], bottleneck=13), ValueError,
         r"Adapter 'inp.adapter'.*bottleneck \(13\) must not be larger than dim \(12\)"),
        (Net, dict(target_modules=["inp"], bottleneck=4, activation="tanh"), ValueError, "unknown activation 'tanh'"),
        (Net, dict(target_modules=["blocks.0"]), ValueError,
         r"cannot tell the output size of module 'blocks.0' \(FeedForward\)"),
        (Net, dict(target_modules=["tail"], dim=12), ValueError,
         r"module 'tail' is a Sequential, whose children are its layers"),
        (Net, dict(bottle_neck=4), TypeError, r"unknown config keys \['bottle_neck'\]"),
        (Net, dict(target_modules="inp(", bottleneck=4), ValueError,
         r"target_modules='inp\(' is not a valid regular expression: missing \)"),
        (Net, dict(target_modules=["inp"], bottleneck=4, backend="nope"), ValueError,
         r"Adapter 'inp.adapter'.*backend must be None, 'auto' or one of"),
        ("gpt2", dict(placement="pfeiffer", bottleneck=17), ValueError,
         r"Adapter 'h.0.mlp.adapter'.*bottleneck \(17\)"),
    ],
)  # fmt: skip
def test_injection_errors_leave_the_model_unchanged(bases, model_maker, config, error, message):
    model = copy.deepcopy(bases[model_maker]) if isinstance(model_maker, str) else model_maker()
    keys = set(model.state_dict())
    with pytest.raises(error, match=message):
        inject_bottleneck(model, config)
    assert set(model.state_dict()) == keys and not bottleneck_adapters(model)


def test_double_injection_and_wrong_dim_are_reported():
    model = inject_bottleneck(Net(), dict(target_modules=["inp"], bottleneck=2, backend=BACKEND))
    with pytest.raises(ValueError, match="module 'inp' already has an attribute 'adapter'"):
        inject_bottleneck(model, dict(target_modules=["inp"], bottleneck=2))
    wrong = inject_bottleneck(Net(), dict(target_modules=["head"], bottleneck=2, dim=12, backend=BACKEND))
    message = r"Adapter 'head.adapter': expected input of shape \[\.\.\., 12\], got \[4, 3\]"
    with pytest.raises(ValueError, match=message):
        wrong(torch.randn(4, 6))
    with pytest.raises(ValueError, match="has no adapters; call inject_bottleneck first"):
        mark_only_bottleneck_trainable(Net())
    with pytest.raises(ValueError, match="has no adapters; call inject_bottleneck first"):
        save_bottleneck(Net(), "unused")


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2


def test_minilm_houlsby_adapters_train_with_frozen_base(minilm, trains_only_what_it_should):
    base, _, batch = minilm
    model = inject_bottleneck(copy.deepcopy(base), dict(placement="houlsby", bottleneck=32))  # default backend
    assert len(bottleneck_adapters(model)) == 12  # 6 layers x (attention, feed-forward)

    def embed(m):
        hidden_states = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(1) / mask.sum(1)

    with torch.no_grad():
        assert torch.equal(embed(model), embed(base))
    mark_only_bottleneck_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters())) - len(list(base.parameters()))
    target = F.normalize(torch.randn(len(batch["input_ids"]), 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    trains_only_what_it_should(model, lambda: 1 - F.cosine_similarity(embed(model), target).mean(), trainable)
