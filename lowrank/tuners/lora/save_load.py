"""Save and load LoRA adapters in Hugging Face PEFT's on-disk format (safetensors + JSON, never pickle).

A directory holds
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight / .lora_B.weight
                                (Linear, Conv1D, Conv2d) and base_model.model.<module>.lora_embedding_A /
                                .lora_embedding_B (Embedding), in our layouts, which are PEFT's
    adapter_config.json         peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, ...

so `peft.PeftModel.from_pretrained(base_model, directory)` reads what save_lora writes, and
load_lora reads what PEFT's `save_pretrained` writes.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch
from torch import nn

from lowrank._files import read_json, read_tensors, write_tensors
from lowrank.nn.lora import LoRAConv1D, LoRAEmbedding, LoRALayer, check_lora_hyperparameters
from lowrank.tuners.lora.model import LoRAConfig, install_lora_layers, lora_layers, make_lora_layers

__all__ = ["save_lora", "load_lora"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)"
)

# PEFT features these layers do not implement: config field -> value that means "not used".
_UNSUPPORTED_FIELDS = {
    "use_dora": False,
    "use_rslora": False,
    "lora_bias": False,
    "bias": "none",
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
}


def _keys_for(name: str, layer: LoRALayer) -> tuple[str, str]:
    if isinstance(layer, LoRAEmbedding):
        return f"{_PREFIX}{name}.lora_embedding_A", f"{_PREFIX}{name}.lora_embedding_B"
    return f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a trailing run of name parts (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _json_number(value: float):
    return int(value) if float(value).is_integer() else float(value)


def save_lora(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write only the LoRA weights and a PEFT LoraConfig for them into `directory`."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_lora: the model has no LoRA layers; call inject_lora first")
    record = getattr(model, "lora_config", None)
    if record is None:  # layers built by hand: take the most common settings as the defaults
        settings = Counter((layer.r, layer.alpha, layer.dropout) for layer in layers.values())
        record = LoRAConfig(*settings.most_common(1)[0][0])

    tensors = {}
    for name, layer in layers.items():
        key_A, key_B = _keys_for(name, layer)
        tensors[key_A] = layer.lora_A.detach().contiguous()
        tensors[key_B] = layer.lora_B.detach().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": record.r,
        "lora_alpha": _json_number(record.alpha),
        "lora_dropout": record.dropout,
        "target_modules": sorted(layers),
        # Layers whose rank or alpha differs from the defaults, keyed by full module name.
        "rank_pattern": {name: layer.r for name, layer in layers.items() if layer.r != record.r},
        "alpha_pattern": {
            name: _json_number(layer.alpha) for name, layer in layers.items() if layer.alpha != record.alpha
        },
        "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for layer in layers.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    os.makedirs(directory, exist_ok=True)
    write_tensors(os.path.join(directory, WEIGHTS_NAME), tensors)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_lora: no {CONFIG_NAME} in {directory}")
    config = read_json(path, "load_lora")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"load_lora: peft_type {config.get('peft_type')!r} is not supported; only 'LORA' adapters load"
        )
    for field_name, unused in _UNSUPPORTED_FIELDS.items():
        if config.get(field_name, unused) not in (unused, False, None, [], {}):
            raise ValueError(
                f"load_lora: the adapter uses {field_name}={config[field_name]!r}, which lowrank does not support"
            )
    return config


def _read_weights(directory: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {key part: tensor}} from the safetensors file."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        why = " (adapter_model.bin is pickle-based and is never loaded; re-save it as safetensors)" if pickled else ""
        raise FileNotFoundError(f"load_lora: no {WEIGHTS_NAME} in {directory}{why}")
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(path, "load_lora").items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"load_lora: unexpected key {key!r}; expected {_PREFIX}<module>.lora_A.weight / lora_B.weight"
            )
        by_module.setdefault(match["module"], {})[key] = tensor
    return by_module


def load_lora(model: nn.Module, directory: str | os.PathLike, backend=None) -> nn.Module:
    """Load an adapter saved by save_lora or by PEFT into `model` and return it.

    A model without LoRA layers gets them, on exactly the modules the adapter has weights for,
    with r / alpha / dropout from its config (and the base weights frozen). A model that
    already has LoRA layers must have the same set of them.
    """
    directory = os.fspath(directory)
    config = _read_config(directory)
    weights = _read_weights(directory)
    # Missing fields take PEFT's LoraConfig defaults.
    default_r, default_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    dropout = float(config.get("lora_dropout", 0.0))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def hyperparameters(name: str) -> tuple[int, float]:
        return _pattern_value(rank_pattern, name, default_r), _pattern_value(alpha_pattern, name, default_alpha)

    layers = lora_layers(model)
    new_layers: dict[str, LoRALayer] = {}
    if not layers:
        for name in sorted(weights):
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"load_lora: the adapter has weights for module {name!r}, which the model lacks"
                ) from None
            new_layers |= make_lora_layers(model, [name], *hyperparameters(name), dropout, backend)
        layers = new_layers

    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"load_lora: LoRA layers {merged[:3]} are merged into their base weights; call unmerge_lora first"
        )
    missing = sorted(set(layers) - set(weights))
    if missing:
        raise ValueError(f"load_lora: the adapter has no weights for the model's LoRA layers {missing}")
    extra = sorted(set(weights) - set(layers))
    if extra:
        raise ValueError(f"load_lora: the adapter has weights for {extra}, which are not LoRA layers in the model")

    # Check every tensor before installing or copying anything, so a failed load leaves the model as it was.
    for name, layer in layers.items():
        key_A, key_B = _keys_for(name, layer)
        found = weights[name]
        for key, param in ((key_A, layer.lora_A), (key_B, layer.lora_B)):
            if key not in found:
                raise ValueError(f"load_lora: missing key {key!r} (the adapter has {sorted(found)} for {name!r})")
            if found[key].shape != param.shape:
                raise ValueError(
                    f"load_lora: {key} has shape {tuple(found[key].shape)} in the adapter, but the model's "
                    f"{type(layer).__name__} {name!r} needs {tuple(param.shape)}"
                )
        r, alpha = hyperparameters(name)
        check_lora_hyperparameters(f"load_lora ({name})", r, alpha, dropout)
        if r != layer.r:
            raise ValueError(f"load_lora: the adapter config gives {name!r} r={r}, but its weights have r={layer.r}")
    if new_layers:
        install_lora_layers(model, new_layers)
        model.lora_config = LoRAConfig(default_r, default_alpha, dropout, sorted(new_layers))
    with torch.no_grad():
        for name, layer in layers.items():
            key_A, key_B = _keys_for(name, layer)
            layer.lora_A.copy_(weights[name][key_A])
            layer.lora_B.copy_(weights[name][key_B])
            layer.alpha = hyperparameters(name)[1]
            if not isinstance(layer, LoRAEmbedding):  # embeddings have no dropout
                layer.dropout = dropout
    return model
