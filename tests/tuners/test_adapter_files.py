"""The files of every tuning method (lora, bottleneck, prompt): a content hash in the safetensors
metadata that loading checks, files without one (PEFT's) still loading, and damaged or malformed
files refused with their path."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank
from lowrank.finetune.models import SmallViT
from lowrank.nn import SoftPrompt


class TwoLayers(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def lora_model():
    torch.manual_seed(0)
    return lowrank.inject_lora(TwoLayers(), ["fc1", "fc2"], r=2, backend="torch")


def bottleneck_model():
    torch.manual_seed(0)
    return lowrank.inject_bottleneck(TwoLayers(), {"target_modules": ["fc1"], "bottleneck": 4, "backend": "torch"})


def prompt_model():
    torch.manual_seed(0)
    return SoftPrompt(3, 8)


# method: (a model with the method's modules, save, load, weights file, config file)
METHODS = {
    "lora": (lora_model, lowrank.save_lora, lowrank.load_lora, "adapter_model.safetensors", "adapter_config.json"),
    "bottleneck": (bottleneck_model, lowrank.save_bottleneck, lowrank.load_bottleneck,
                   "bottleneck_adapters.safetensors", "bottleneck_adapters.json"),
    "prompt": (prompt_model, lowrank.save_prompt, lowrank.load_prompt, "prompt_model.safetensors",
               "prompt_config.json"),
}


def saved(method, directory):
    make, save, load, weights, config = METHODS[method]
    save(make(), directory)
    return make, load, directory / weights, directory / config


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("method", METHODS)
def test_bit_flipped_weights_are_refused(method, tmp_path):
    make, load, weights, _ = saved(method, tmp_path)
    load(make(), tmp_path)  # intact: loads
    flip_last_byte(weights)
    with pytest.raises(ValueError, match=rf"{weights} is corrupt: its tensors hash to sha256 .* its own metadata"):
        load(make(), tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_a_file_without_a_hash_still_loads(method, tmp_path):
    """PEFT, and any other writer, leaves the hash out: such a file loads unchecked."""
    make, load, weights, _ = saved(method, tmp_path)
    tensors = load_file(weights)
    save_file(tensors, weights, metadata={"format": "pt"})
    load(make(), tmp_path)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("damage, message", [
    (lambda weights, config: weights.write_bytes(weights.read_bytes()[:50]), "{weights} is not a readable safetensors"),
    (lambda weights, config: config.write_text(config.read_text()[:20]), "{config} is not valid JSON"),
    (lambda weights, config: config.write_text("[]"), "{config} holds a JSON list; expected an object"),
    (lambda weights, config: config.write_text('{"a": 1, "a": 2}'), "{config} has the key 'a' twice"),
], ids=["truncated-weights", "truncated-config", "list-config", "repeated-key"])
def test_damaged_files_are_refused_naming_them(method, tmp_path, damage, message):
    make, load, weights, config = saved(method, tmp_path)
    damage(weights, config)
    with pytest.raises(ValueError, match=message.format(weights=weights, config=config)):
        load(make(), tmp_path)


@pytest.mark.parametrize("narrow, wide, site", [
    (lambda: SmallViT(dim=16, depth=1, num_heads=2), lambda: SmallViT(dim=32, depth=1, num_heads=2), "blocks.0.attn"),
    (lambda: TwoLayers(16), lambda: TwoLayers(32), "fc1"),
], ids=["houlsby-block", "target-module"])
def test_adapters_of_another_width_fail_at_load_naming_the_adapter(narrow, wide, site, tmp_path):
    """Width-16 adapters loading into a width-32 model used to fail only at the first forward."""
    config = {"placement": "houlsby"} if site.startswith("blocks") else {"target_modules": [site]}
    lowrank.save_bottleneck(lowrank.inject_bottleneck(narrow(), {**config, "bottleneck": 4}), tmp_path)
    model = wide()
    with pytest.raises(ValueError, match=rf"adapter '{site}.adapter' was saved with dim=16, but the model's "
                                         rf"'{site}' carries 32 features"):
        lowrank.load_bottleneck(model, tmp_path)
    assert not lowrank.tuners.bottleneck.bottleneck_adapters(model)


def test_bottleneck_config_records_are_checked(tmp_path):
    lowrank.save_bottleneck(bottleneck_model(), tmp_path)
    path = tmp_path / "bottleneck_adapters.json"
    config = json.loads(path.read_text())
    del config["adapters"]["fc1.adapter"]["dim"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"adapter 'fc1.adapter'\): {path} lacks the field 'dim'"):
        lowrank.load_bottleneck(TwoLayers(), tmp_path)
