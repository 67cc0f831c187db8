"""LoRA on the real all-MiniLM-L6-v2 (6-layer BERT), offline, plus torch.compile of LoRALinear."""

import copy

import pytest
import torch
from torch import nn

from lowrank import (
    adapter_batch,
    disable_adapters,
    inject_lora,
    load_lora,
    mark_only_lora_trainable,
    merge_lora,
    save_lora,
    set_adapter,
    unmerge_lora,
)
from lowrank.nn import LoRALinear
from lowrank.tuners.lora.model import lora_layers

transformers = pytest.importorskip("transformers")

BACKEND = "torch"
TARGETS = ["query", "key", "value"]


@pytest.fixture(scope="module")
def base_and_batch(minilm):
    model, _, batch = minilm
    return model, batch


# The fp32 model itself is ~3.5e-5 off its float64 twin on these sentences; different but equally
# valid summation orders (another backend, a merged weight) may differ by about that much.
FP32_NOISE = dict(rtol=1e-4, atol=5e-5)


def hidden_states(model, batch):
    """Last hidden states at real tokens (padding positions carry no meaning and amplify noise)."""
    return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def embed(model, batch):
    """Sentence-transformers' mean pooling over real tokens."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def lora_model(base, **kwargs):
    return inject_lora(copy.deepcopy(base), TARGETS, r=4, alpha=8, backend=BACKEND, **kwargs)


def randomize_lora_B(model, std=0.02):
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=std)


def peft_model_with_trained_B(peft, base, **more_adapters):
    """A PEFT model (eval mode) with adapter "default" (r=4 on TARGETS) and `more_adapters` (name=LoraConfig),
    every lora_B drawn from N(0, 0.02²) so that each adapter changes the output."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, config in more_adapters.items():
        peft_model.add_adapter(name, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return peft_model.eval()


def test_injection_leaves_outputs_unchanged(base_and_batch):
    base, batch = base_and_batch
    model = lora_model(base)
    assert len(lora_layers(model)) == 18  # 6 layers x query/key/value
    with torch.no_grad():
        torch.testing.assert_close(hidden_states(model, batch), hidden_states(base, batch), **FP32_NOISE)


def test_outputs_match_peft_with_the_same_adapter(base_and_batch, tmp_path):
    peft = pytest.importorskip("peft")
    base, batch = base_and_batch
    model = lora_model(base)
    randomize_lora_B(model)
    save_lora(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        ours = hidden_states(model, batch)
        assert not torch.allclose(ours, hidden_states(base, batch), atol=1e-3)  # the adapter does something
        torch.testing.assert_close(ours, hidden_states(peft_model, batch), **FP32_NOISE)


def test_adapter_saved_by_peft_gives_peft_outputs(base_and_batch, tmp_path):
    peft = pytest.importorskip("peft")
    base, batch = base_and_batch
    peft_model = peft_model_with_trained_B(peft, base)
    peft_model.save_pretrained(tmp_path)
    model = load_lora(copy.deepcopy(base), tmp_path, backend=BACKEND)
    assert sorted(model.lora_configs["default"].target_modules) == sorted(lora_layers(model))
    assert len(lora_layers(model)) == 18
    with torch.no_grad():
        torch.testing.assert_close(hidden_states(model, batch), hidden_states(peft_model, batch), **FP32_NOISE)


def test_training_lora_only_reduces_loss_and_keeps_base_bit_identical(base_and_batch, trains_only_what_it_should):
    base, batch = base_and_batch
    model = lora_model(base, dropout=0.1)
    mark_only_lora_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 36
    target = torch.nn.functional.normalize(
        torch.randn(len(batch["input_ids"]), 384, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    trains_only_what_it_should(
        model, lambda: 1 - torch.nn.functional.cosine_similarity(embed(model, batch), target).mean(), trainable
    )


def test_merge_gives_same_outputs(base_and_batch):
    base, batch = base_and_batch
    model = lora_model(base)
    randomize_lora_B(model)
    with torch.no_grad():
        expected = hidden_states(model, batch)
        merge_lora(model)
        torch.testing.assert_close(hidden_states(model, batch), expected, **FP32_NOISE)
        unmerge_lora(model)
        torch.testing.assert_close(hidden_states(model, batch), expected, **FP32_NOISE)


def test_torch_compile_fullgraph_with_lora_linear():
    torch.manual_seed(0)
    model = nn.Sequential(
        LoRALinear(16, 32, r=4, dropout=0.1, backend=BACKEND), nn.GELU(), LoRALinear(32, 8, r=4, backend=BACKEND)
    )
    randomize_lora_B(model, std=0.1)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 16)
    for training in (False, True):
        model.train(training)
        torch.manual_seed(1)
        eager = model(x)
        eager.square().sum().backward()
        eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        torch.manual_seed(1)
        out = compiled(x)
        out.square().sum().backward()
        if not training:  # with dropout, eager and compiled draw different seeds
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
            for grad, eager_grad in zip((p.grad for p in model.parameters() if p.requires_grad), eager_grads):
                torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)
        model.zero_grad()


def test_named_adapters_match_peft(base_and_batch, tmp_path):
    """Two adapters from one PEFT directory (the second rsLoRA, in a sub-folder): each alone, both, none, and
    one per sentence in a mixed batch."""
    peft = pytest.importorskip("peft")
    base, batch = base_and_batch
    second = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["value", "dense"], use_rslora=True)
    peft_model = peft_model_with_trained_B(peft, base, sts=second)
    peft_model.save_pretrained(tmp_path)
    model = load_lora(copy.deepcopy(base), tmp_path, backend=BACKEND)
    load_lora(model, tmp_path, adapter_name="sts")
    with torch.no_grad():
        for active in ("default", "sts", ["default", "sts"]):
            peft_model.base_model.set_adapter(active)
            set_adapter(model, active)
            torch.testing.assert_close(hidden_states(model, batch), hidden_states(peft_model, batch), **FP32_NOISE)
        with disable_adapters(model):
            torch.testing.assert_close(hidden_states(model, batch), hidden_states(base, batch), **FP32_NOISE)
        rows = ["sts", "__base__", "default"]
        mask = batch["attention_mask"].bool()
        expected = peft_model(**batch, adapter_names=rows).last_hidden_state[mask]
        with adapter_batch(model, rows):
            torch.testing.assert_close(hidden_states(model, batch), expected, **FP32_NOISE)


def test_dora_adapter_matches_peft_both_ways_and_merges(base_and_batch, tmp_path):
    peft = pytest.importorskip("peft")
    base, batch = base_and_batch
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.05 * torch.randn_like(param))
    peft_model.eval().save_pretrained(tmp_path / "peft")
    model = load_lora(copy.deepcopy(base), tmp_path / "peft", backend=BACKEND)
    save_lora(model, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = hidden_states(peft_model, batch)
        assert not torch.allclose(expected, hidden_states(base, batch), atol=1e-3)  # the adapter does something
        torch.testing.assert_close(hidden_states(model, batch), expected, **FP32_NOISE)
        torch.testing.assert_close(hidden_states(reloaded, batch), expected, **FP32_NOISE)
        merge_lora(model)
        torch.testing.assert_close(hidden_states(model, batch), expected, **FP32_NOISE)
