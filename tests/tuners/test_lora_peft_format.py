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
    assert len(lora_layers(ours)) > 0 and ours.lora_configs["default"].r == 4
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
    assert not lora_layers(model) and not hasattr(model, "lora_configs")  # nothing was installed


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
    with pytest.raises(ValueError, match="is merged into the base weights of .*; call unmerge_lora first"):
        load_lora(model, directory)


# ------------------------------------------------------------------ adapter_config.json allow-list (issue 17, class 1)


def test_real_alora_adapter_is_refused_naming_key_and_file(tiny_hf_model, tmp_path):
    """PEFT's activated LoRA applies the adapter only from the invocation tokens on: loading it as plain
    LoRA gave logits 0.42 away from PEFT's."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    peft.get_peft_model(tiny_hf_model("llama", head=True), config).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        load_lora(tiny_hf_model("llama", head=True), tmp_path)
    assert "alora_invocation_tokens=[5, 6]" in str(error.value)
    assert str(tmp_path / "adapter_config.json") in str(error.value)


def peft_config_value(**options):
    """The value PEFT 0.21 itself writes for one LoraConfig option (first keyword)."""
    key = next(iter(options))
    return key, peft.LoraConfig(r=4, target_modules=["query"], **options).to_dict()[key]


def with_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


REFUSED = [
    peft_config_value(use_qalora=True),
    peft_config_value(use_bdlora=peft.BdLoraConfig()),
    peft_config_value(arrow_config=peft.ArrowConfig()),
    peft_config_value(kasa_config=peft.KasaConfig()),
    peft_config_value(velora_config=peft.VeloraConfig()),
    peft_config_value(monteclora_config=peft.MontecloraConfig()),
    ("bias", "all"),
    ("lora_bias", True),
    ("modules_to_save", ["classifier"]),
    ("layer_replication", [[0, 1]]),
    ("qalora_group_size", 32),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", "loftq"),
    ("an_option_from_a_later_peft", 1),
    ("an_option_from_a_later_peft", "on"),
]


@pytest.mark.parametrize("key, value", REFUSED, ids=[f"{key}={value!r}"[:40] for key, value in REFUSED])
def test_options_lowrank_does_not_implement_are_refused(tiny_hf_model, tmp_path, key, value):
    path = with_config(saved_adapter(tiny_hf_model("bert"), tmp_path), **{key: value})
    model = tiny_hf_model("bert")
    with pytest.raises(ValueError) as error:
        load_lora(model, tmp_path)
    assert f"{key}=" in str(error.value) and str(path) in str(error.value)
    assert not lora_layers(model)


UNUSED = [
    peft_config_value(use_qalora=False),
    ("use_bdlora", None), ("arrow_config", None), ("kasa_config", None), ("velora_config", None),
    ("monteclora_config", None), ("alora_invocation_tokens", None), ("loftq_config", {}), ("modules_to_save", []),
    ("an_option_from_a_later_peft", None), ("an_option_from_a_later_peft", False),
    ("init_lora_weights", "gaussian"), ("task_type", "FEATURE_EXTRACTION"), ("layers_to_transform", [0, 1]),
]  # fmt: skip


@pytest.mark.parametrize("key, value", UNUSED, ids=[f"{key}={value!r}"[:40] for key, value in UNUSED])
def test_options_at_their_unused_value_load(tiny_hf_model, tmp_path, key, value):
    source = inject_lora(tiny_hf_model("bert"), ["query"], r=4, backend=BACKEND)
    randomize_lora_parameters(source)
    save_lora(source, tmp_path)
    with_config(tmp_path, **{key: value})
    model = load_lora(tiny_hf_model("bert"), tmp_path, backend=BACKEND)
    ids = torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(model(ids).last_hidden_state, source(ids).last_hidden_state)


def test_peft_type_must_be_lora(tiny_hf_model, tmp_path):
    with_config(saved_adapter(tiny_hf_model("bert"), tmp_path), peft_type="IA3")
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        load_lora(tiny_hf_model("bert"), tmp_path)


def test_pickle_file_is_never_loaded(tiny_hf_model, tmp_path):
    directory = saved_adapter(tiny_hf_model("bert"), tmp_path)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle-based and is never loaded"):
        load_lora(tiny_hf_model("bert"), directory)
