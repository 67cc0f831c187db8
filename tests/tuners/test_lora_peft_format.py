"""save_lora / load_lora against the installed HF PEFT, in both directions."""

import copy
import json
import os

import pytest
import torch
from torch import nn

from lowrank import inject_lora, load_lora, merge_lora, save_lora
from lowrank.tuners.lora.model import lora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

BACKEND = "torch"


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


# name: (targets, input factory, output getter)
CASES = {
    "bert": (
        ["query", "value", "word_embeddings"], lambda: torch.randint(0, 40, (2, 6)), lambda o: o.last_hidden_state
    ),
    "gpt2": (["c_attn", "mlp.c_proj"], lambda: torch.randint(0, 40, (2, 6)), lambda o: o.last_hidden_state),
    "convnet": (["conv", "head"], lambda: torch.randn(2, 3, 8, 8), lambda o: o),
}


def case_base(tiny_hf_model, case):
    return ConvNet().eval() if case == "convnet" else tiny_hf_model(case)


def randomize_lora_parameters(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.1)


@pytest.mark.parametrize("case", CASES)
def test_saved_by_us_loads_in_peft(tiny_hf_model, case, tmp_path):
    targets, make_input, output = CASES[case]
    base = case_base(tiny_hf_model, case)
    ours = inject_lora(copy.deepcopy(base), targets, r=4, alpha=8, backend=BACKEND)
    randomize_lora_parameters(ours)
    save_lora(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    x = make_input()
    torch.testing.assert_close(output(peft_model(x)), output(ours(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_saved_by_peft_loads_in_ours(tiny_hf_model, case, tmp_path):
    targets, make_input, output = CASES[case]
    base = case_base(tiny_hf_model, case)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=case == "gpt2")
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randomize_lora_parameters(peft_model)
    peft_model.save_pretrained(tmp_path)

    ours = load_lora(base, tmp_path, backend=BACKEND)
    assert len(lora_layers(ours)) > 0 and ours.lora_config.r == 4
    x = make_input()
    torch.testing.assert_close(output(ours(x)), output(peft_model(x)), rtol=1e-5, atol=1e-5)


def test_rank_and_alpha_patterns_round_trip_both_ways(tiny_hf_model, tmp_path):
    base = tiny_hf_model("bert")
    ours = inject_lora(copy.deepcopy(base), ["query"], r=4, alpha=8, backend=BACKEND)
    inject_lora(ours, ["encoder.layer.1.attention.self.value"], r=2, alpha=6, backend=BACKEND)
    randomize_lora_parameters(ours)
    save_lora(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"encoder.layer.1.attention.self.value": 2}
    assert config["alpha_pattern"] == {"encoder.layer.1.attention.self.value": 6}

    ids = torch.randint(0, 40, (2, 6))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_model(ids).last_hidden_state, ours(ids).last_hidden_state, rtol=1e-5, atol=1e-5)

    peft_model.save_pretrained(tmp_path / "peft")
    reloaded = load_lora(copy.deepcopy(base), tmp_path / "peft", backend=BACKEND)
    assert {name: (layer.r, layer.alpha) for name, layer in lora_layers(reloaded).items()} == {
        "encoder.layer.0.attention.self.query": (4, 8),
        "encoder.layer.1.attention.self.query": (4, 8),
        "encoder.layer.1.attention.self.value": (2, 6),
    }
    torch.testing.assert_close(reloaded(ids).last_hidden_state, ours(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_loads_into_existing_lora_layers(tiny_hf_model, tmp_path):
    source = inject_lora(tiny_hf_model("bert"), ["query"], r=4, alpha=8, backend=BACKEND)
    randomize_lora_parameters(source)
    save_lora(source, tmp_path)
    target = inject_lora(tiny_hf_model("bert"), ["query"], r=4, alpha=32, backend=BACKEND)
    load_lora(target, tmp_path)
    ids = torch.randint(0, 40, (2, 6))
    assert target.encoder.layer[0].attention.self.query.alpha == 8  # the adapter's config wins
    torch.testing.assert_close(target(ids).last_hidden_state, source(ids).last_hidden_state)


def saved_adapter(base, tmp_path, **inject_kwargs):
    model = inject_lora(base, ["query"], r=4, backend=BACKEND, **inject_kwargs)
    save_lora(model, tmp_path)
    return tmp_path


def test_shape_mismatch_names_key_and_both_shapes(tiny_hf_model, tmp_path):
    directory = saved_adapter(tiny_hf_model("bert"), tmp_path)
    model = tiny_hf_model("bert", dim=32)
    with pytest.raises(ValueError) as error:
        load_lora(model, directory, backend=BACKEND)
    message = str(error.value)
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in message
    assert "(4, 16)" in message and "(4, 32)" in message
    assert not lora_layers(model) and not hasattr(model, "lora_config")  # nothing was installed


def test_missing_and_unexpected_modules(tiny_hf_model, tmp_path):
    directory = saved_adapter(tiny_hf_model("bert"), tmp_path)
    model = inject_lora(tiny_hf_model("bert"), ["query", "key"], r=4, backend=BACKEND)
    with pytest.raises(
        ValueError, match=r"no weights for the model's LoRA layers \['encoder.layer.0.attention.self.key'"
    ):
        load_lora(model, directory)
    model = inject_lora(tiny_hf_model("bert"), ["encoder.layer.0.attention.self.query"], r=4, backend=BACKEND)
    with pytest.raises(ValueError, match=r"weights for \['encoder.layer.1.attention.self.query'\], which are not LoRA"):
        load_lora(model, directory)
    with pytest.raises(
        ValueError, match="weights for module 'encoder.layer.0.attention.self.query', which the model lacks"
    ):
        load_lora(ConvNet(), directory)


def test_merged_model_is_refused(tiny_hf_model, tmp_path):
    directory = saved_adapter(tiny_hf_model("bert"), tmp_path)
    model = merge_lora(inject_lora(tiny_hf_model("bert"), ["query"], r=4, backend=BACKEND))
    with pytest.raises(ValueError, match="merged into their base weights; call unmerge_lora first"):
        load_lora(model, directory)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("peft_type", "IA3", "peft_type 'IA3' is not supported"),
        ("use_dora", True, "uses use_dora=True"),
        ("bias", "all", "uses bias='all'"),
    ],
)
def test_unsupported_config_is_refused(tiny_hf_model, tmp_path, field, value, match):
    directory = saved_adapter(tiny_hf_model("bert"), tmp_path)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_lora(tiny_hf_model("bert"), directory)


def test_pickle_file_is_never_loaded(tiny_hf_model, tmp_path):
    directory = saved_adapter(tiny_hf_model("bert"), tmp_path)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle-based and is never loaded"):
        load_lora(tiny_hf_model("bert"), directory)
