"""Save, load and train only the prompt parameters of a model (safetensors + JSON, never pickle).

The prompt modules of a model are its SoftPrompt and PrefixEncoder submodules (a
PrefixAttention holds its prefix in one). A directory holds
    prompt_model.safetensors   <module name>.<parameter name> for every prompt module
    prompt_config.json         {"format": "lowrank-prompt", "modules": {<module name>:
                               {"type": "SoftPrompt", "num_virtual_tokens": 20, "dim": 384}, ...}}
and load_prompt copies the tensors into a model whose prompt modules have the same names,
types and hyperparameters, refusing anything else before it changes a single value.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from lowrank._files import read_json, read_tensors, write_tensors
from lowrank.tuners.prompt.model import require_prompt_modules

__all__ = ["save_prompt", "load_prompt"]

WEIGHTS_NAME = "prompt_model.safetensors"
CONFIG_NAME = "prompt_config.json"
FORMAT = "lowrank-prompt"


def _config_of(modules: dict) -> dict:
    return {name: {"type": type(module).__name__, **module.prompt_config()} for name, module in modules.items()}


def _tensors_of(modules: dict) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{param_name}" if name else param_name: param
        for name, module in modules.items()
        for param_name, param in module.named_parameters()
    }


def save_prompt(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write only the prompt modules' parameters and hyperparameters into `directory`."""
    modules = require_prompt_modules("save_prompt", model)
    tensors = {key: param.detach().contiguous() for key, param in _tensors_of(modules).items()}
    os.makedirs(directory, exist_ok=True)
    write_tensors(os.path.join(directory, WEIGHTS_NAME), tensors)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump({"format": FORMAT, "modules": _config_of(modules)}, f, indent=2, sort_keys=True)


def load_prompt(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy prompt parameters saved by save_prompt into the matching prompt modules of `model`."""
    directory = os.fspath(directory)
    modules = require_prompt_modules("load_prompt", model)
    for file_name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, file_name)):
            raise FileNotFoundError(f"load_prompt: no {file_name} in {directory}")
    saved = read_json(os.path.join(directory, CONFIG_NAME), "load_prompt")
    if saved.get("format") != FORMAT:
        raise ValueError(f"load_prompt: {CONFIG_NAME} has format {saved.get('format')!r}, expected {FORMAT!r}")
    saved_modules, own_modules = saved.get("modules"), _config_of(modules)
    if not isinstance(saved_modules, dict):
        raise ValueError(f"load_prompt: {os.path.join(directory, CONFIG_NAME)} has modules={saved_modules!r}; "
                         "expected an object of prompt modules")
    if sorted(saved_modules) != sorted(own_modules):
        raise ValueError(
            f"load_prompt: the file has prompt modules {sorted(saved_modules)}, the model has {sorted(own_modules)}"
        )
    for name, own in own_modules.items():
        if saved_modules[name] != own:
            raise ValueError(
                f"load_prompt: prompt module {name!r} was saved as {saved_modules[name]}, the model's is {own}"
            )

    tensors, params = read_tensors(os.path.join(directory, WEIGHTS_NAME), "load_prompt"), _tensors_of(modules)
    if sorted(tensors) != sorted(params):
        raise ValueError(f"load_prompt: the file has tensors {sorted(tensors)}, the model expects {sorted(params)}")
    for key, param in params.items():
        if tensors[key].shape != param.shape:
            raise ValueError(
                f"load_prompt: {key} has shape {tuple(tensors[key].shape)} in the file, "
                f"the model needs {tuple(param.shape)}"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
    return model
