"""inject_lora targeting rules, model surgery on plain / torchvision-style / Hugging Face models, errors."""

import pytest
import torch
from torch import nn

import lowrank
from lowrank import inject_lora, mark_only_lora_trainable, merge_lora, unmerge_lora
from lowrank.nn import LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALinear
from lowrank.tuners.lora.model import LoRAConfig, lora_layers

BACKEND = "torch"


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.xq = nn.Linear(dim, dim)  # "q" must not match this name (suffixes end on '.')
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.q(x) + self.xq(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=30, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(h)


def tiny_convnet():
    """torchvision-style: nested Sequentials with numeric child names."""
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 3, stride=2), nn.ReLU())
    )
    classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(8 * 3 * 3, 10))
    return nn.Sequential(features, classifier)


def lora_names(model):
    return sorted(lora_layers(model))


@pytest.mark.parametrize(
    "target, expected",
    [
        (["q"], ["blocks.0.q", "blocks.1.q"]),
        (["blocks.1.q"], ["blocks.1.q"]),
        (["1.q", "embed"], ["blocks.1.q", "embed"]),
        (r"blocks\.\d\.x?q", ["blocks.0.q", "blocks.0.xq", "blocks.1.q", "blocks.1.xq"]),
        (r"blocks\.0\.q", ["blocks.0.q"]),
        ("all-linear", ["blocks.0.q", "blocks.0.xq", "blocks.1.q", "blocks.1.xq"]),  # lm_head excluded
    ],
)
def test_targeting_rules(target, expected):
    model = inject_lora(TinyLM(), target, r=2, backend=BACKEND)
    assert lora_names(model) == expected


def test_regex_must_match_the_whole_name():
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(TinyLM(), "q")  # a regex: would only hit a module named exactly "q"


def test_replaces_in_place_and_keeps_output_and_state_dict_keys():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 30, (2, 5))
    expected = model(ids)
    keys_before = set(model.state_dict())
    q_weight = model.blocks[0].q.weight
    assert inject_lora(model, ["q", "embed"], r=2, alpha=4, dropout=0.1, backend=BACKEND) is model
    assert isinstance(model.blocks[0].q, LoRALinear) and isinstance(model.embed, LoRAEmbedding)
    assert model.blocks[0].q.weight is q_weight  # reused, not copied
    model.eval()
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-6)
    added = set(model.state_dict()) - keys_before
    assert keys_before <= set(model.state_dict())
    assert added == {f"{name}.lora_{ab}" for name in ("blocks.0.q", "blocks.1.q", "embed") for ab in "AB"}
    assert model.lora_configs == {"default": LoRAConfig(2, 4, 0.1, ["embed", "blocks.0.q", "blocks.1.q"])}


def test_torchvision_style_model_trains_only_lora():
    model = tiny_convnet()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    inject_lora(model, ["0.0", "0.2.0", "1.2"], r=2, backend=BACKEND)
    assert isinstance(model[0][0], LoRAConv2d) and isinstance(model[0][2][0], LoRAConv2d)
    assert isinstance(model[1][2], LoRALinear)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    mark_only_lora_trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    assert not torch.allclose(model(x), expected)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_merge_and_unmerge_whole_model():
    model = tiny_convnet()
    inject_lora(model, ["0.0", "1.2"], r=2, backend=BACKEND)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bias, trainable",
    [
        ("none", set()),
        ("all", {"blocks.0.q.bias", "blocks.0.xq.bias", "blocks.1.q.bias", "blocks.1.xq.bias", "lm_head.bias"}),
        ("lora_only", {"blocks.0.q.bias", "blocks.1.q.bias"}),
    ],
)
def test_mark_only_lora_trainable(bias, trainable):
    model = inject_lora(TinyLM(), ["q"], r=2, backend=BACKEND)
    mark_only_lora_trainable(model, bias=bias)
    lora = {f"blocks.{i}.q.lora_{ab}" for i in (0, 1) for ab in "AB"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora | trainable


def test_errors():
    with pytest.raises(ValueError, match=r"matched no module.*blocks\.0\.q.*'q', 'xq'"):
        inject_lora(TinyLM(), ["query"])
    with pytest.raises(ValueError, match="'blocks.0.act' is a ReLU; supported layers are"):
        inject_lora(TinyLM(), ["act"])
    model = inject_lora(TinyLM(), ["q"], backend=BACKEND)
    with pytest.raises(ValueError, match="cannot add LoRA to 'blocks.0.q': .*already has LoRA adapter 'default'"):
        inject_lora(model, ["q"])
    with pytest.raises(ValueError, match="inject_lora: r .* must be a positive integer"):
        inject_lora(TinyLM(), ["q"], r=0)
    with pytest.raises(TypeError, match="target_modules must be"):
        inject_lora(TinyLM(), [])
    with pytest.raises(ValueError, match="mark_only_lora_trainable: bias must be"):
        mark_only_lora_trainable(model, bias="some")
    with pytest.raises(ValueError, match="merge_lora: the model has no LoRA layers"):
        merge_lora(TinyLM())
    with pytest.raises(ValueError, match="inject_lora: target_modules .* is not a valid regular expression"):
        inject_lora(TinyLM(), r"blocks\.(q")
    with pytest.raises(ValueError, match="inject_lora: backend must be None, 'auto' or one of"):
        inject_lora(TinyLM(), ["q"], backend="nope")  # refused when injected, not at the first forward


def test_failed_injection_leaves_model_untouched():
    model = tiny_convnet()
    model[0][2][0] = nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(ValueError, match="cannot add LoRA to '0.2.0': LoRAConv2d: only groups=1"):
        inject_lora(model, ["0.0", "0.2.0"], backend=BACKEND)
    assert not lora_layers(model) and not hasattr(model, "lora_configs")


# ------------------------------------------------------------------ Hugging Face models


def test_hf_bert_query_value(tiny_hf_model):
    model = tiny_hf_model("bert")
    ids = torch.randint(0, 40, (2, 6))
    expected = model(ids).last_hidden_state
    inject_lora(model, ["query", "value"], r=4, backend=BACKEND)
    assert lora_names(model) == [f"encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    torch.testing.assert_close(model(ids).last_hidden_state, expected, rtol=0, atol=1e-6)
    mark_only_lora_trainable(model)
    model(ids).last_hidden_state.sum().backward()
    layer = model.encoder.layer[0].attention.self.query
    assert layer.lora_B.grad is not None and layer.weight.grad is None


def test_hf_gpt2_all_linear_uses_conv1d_and_skips_lm_head(tiny_hf_model):
    model = tiny_hf_model("gpt2", head=True)
    ids = torch.randint(0, 40, (2, 6))
    expected = model(ids).logits
    inject_lora(model, "all-linear", r=4, backend=BACKEND)
    names = lora_names(model)
    assert "lm_head" not in names and len(names) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per layer
    assert all(isinstance(layer, LoRAConv1D) for layer in lora_layers(model).values())
    assert model.lm_head.weight is model.transformer.wte.weight  # tying untouched
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)


def test_hf_embedding_lora_keeps_weight_tying(tiny_hf_model):
    model = tiny_hf_model("gpt2", head=True)
    inject_lora(model, ["wte"], r=2, backend=BACKEND)
    assert isinstance(model.transformer.wte, LoRAEmbedding)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_lora_refuses_a_module_that_carries_an_adapter():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lowrank.inject_bottleneck(model, {"target_modules": ["0"], "bottleneck": 2})
    with pytest.raises(ValueError, match="'0' carries forward hooks or child modules"):
        lowrank.inject_lora(model, ["0"])
    assert isinstance(model[0], nn.Linear) and hasattr(model[0], "adapter")  # left as it was
