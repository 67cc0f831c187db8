"""Save and load bottleneck adapters (safetensors + JSON, never pickle).

A directory holds
    bottleneck_adapters.safetensors   <adapter module name>.down.weight / .down.bias / .up.weight / .up.bias
    bottleneck_adapters.json          {"format": "lowrank-bottleneck-adapters", "version": 1, "adapters":
                                      {<name>: {"kind", "dim", "bottleneck", "activation", "scaling", "residual"}}}
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from lowrank._files import read_json, read_tensors, require_fields, write_tensors
from lowrank.nn.adapter import Adapter
from lowrank.tuners.bottleneck.model import (
    CHILD,
    KINDS,
    SHOWN,
    adapter_sites,
    bottleneck_adapters,
    build_adapter,
    install_adapters,
    join_name,
    site_width,
)

__all__ = ["save_bottleneck", "load_bottleneck"]

WEIGHTS_NAME = "bottleneck_adapters.safetensors"
CONFIG_NAME = "bottleneck_adapters.json"
_FORMAT = "lowrank-bottleneck-adapters"

_PARAMS = ("down.weight", "down.bias", "up.weight", "up.bias")
_RECORD_TYPES = {"kind": (str, type(None)), "dim": int, "bottleneck": int, "activation": str, "scaling": (int, float),
                 "residual": bool}


def _record(adapter: Adapter, kind: str | None) -> dict:
    return {
        "kind": kind,  # None: the adapter is part of the model's own structure, not hooked in
        "dim": adapter.dim,
        "bottleneck": adapter.bottleneck,
        "activation": adapter.activation,
        "scaling": adapter.scaling,
        "residual": adapter.residual,
    }


def save_bottleneck(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write only the adapters' weights (safetensors, keys as in the model's state_dict) and a JSON
    description of where they sit into `directory`."""
    adapters = bottleneck_adapters(model)
    if not adapters:
        raise ValueError("save_bottleneck: the model has no adapters; call inject_bottleneck first")
    kinds = adapter_sites(model)
    tensors = {
        f"{name}.{param}": adapter.get_parameter(param).detach().contiguous()
        for name, adapter in adapters.items()
        for param in _PARAMS
    }
    config = {
        "format": _FORMAT,
        "version": 1,
        "adapters": {name: _record(adapter, kinds.get(name)) for name, adapter in adapters.items()},
    }
    os.makedirs(directory, exist_ok=True)
    write_tensors(os.path.join(directory, WEIGHTS_NAME), tensors)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    paths = [os.path.join(directory, name) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_bottleneck: no {os.path.basename(path)} in {directory}")
    config = read_json(paths[0], "load_bottleneck")
    if config.get("format") != _FORMAT or not isinstance(config.get("adapters"), dict):
        raise ValueError(f"load_bottleneck: {paths[0]} is not a lowrank bottleneck-adapter config")
    for name, record in config["adapters"].items():
        if not isinstance(record, dict):
            raise ValueError(f"load_bottleneck: {paths[0]} describes adapter {name!r} as {record!r}; "
                             "expected an object")
        require_fields(f"load_bottleneck (adapter {name!r})", paths[0], record, _RECORD_TYPES)
        if record["kind"] not in (None, *KINDS):
            raise ValueError(f"load_bottleneck: adapter {name!r} has unknown kind {record['kind']!r}")
    return config["adapters"], read_tensors(paths[1], "load_bottleneck")


def load_bottleneck(model: nn.Module, directory: str | os.PathLike, backend=None) -> nn.Module:
    """Load adapters saved by save_bottleneck into `model` and return it.

    A model without adapters gets them, at the saved sites, hooked in the saved way. A model that has
    adapters must have exactly the saved set, with the same activation and residual mode. Every name
    and shape is checked before anything is installed or copied.
    """
    directory = os.fspath(directory)
    records, tensors = _read(directory)
    adapters = bottleneck_adapters(model)
    built: dict[str, tuple[str, Adapter]] = {}
    if not adapters:
        for name, record in records.items():
            site_name, _, child = name.rpartition(".")
            if record["kind"] is None or child != CHILD:
                raise ValueError(
                    f"load_bottleneck: adapter {name!r} is part of the saved model's own structure, "
                    "which this model lacks"
                )
            try:
                model.get_submodule(site_name)
            except AttributeError:
                raise ValueError(
                    f"load_bottleneck: the saved adapter {name!r} sits at {site_name!r}, which the model lacks"
                ) from None
            width = site_width(model, site_name, record["kind"])
            if width is not None and width != record["dim"]:
                raise ValueError(
                    f"load_bottleneck: adapter {name!r} was saved with dim={record['dim']}, but the model's "
                    f"{site_name!r} carries {width} features"
                )
            built[site_name] = (record["kind"], build_adapter(
                "load_bottleneck", model, site_name, record["kind"], record["dim"], record["bottleneck"],
                record["activation"], record["scaling"], backend=backend,
            ))  # fmt: skip
        adapters = {join_name(site, CHILD): adapter for site, (_, adapter) in built.items()}

    missing, extra = sorted(set(adapters) - set(records)), sorted(set(records) - set(adapters))
    if missing:
        raise ValueError(f"load_bottleneck: the file has no adapter for the model's adapters {missing}")
    if extra:
        raise ValueError(f"load_bottleneck: the file has adapters {extra}, which the model lacks")
    unexpected = sorted(set(tensors) - {f"{name}.{param}" for name in adapters for param in _PARAMS})
    if unexpected:
        raise ValueError(f"load_bottleneck: unexpected tensors in {WEIGHTS_NAME}: {unexpected[:SHOWN]}")
    for name, adapter in adapters.items():
        record = records[name]
        for attribute in ("activation", "residual"):
            if record[attribute] != getattr(adapter, attribute):
                raise ValueError(
                    f"load_bottleneck: adapter {name!r} was saved with {attribute}={record[attribute]!r}, "
                    f"the model's has {getattr(adapter, attribute)!r}"
                )
        for param in _PARAMS:
            key, expected = f"{name}.{param}", adapter.get_parameter(param).shape
            if key not in tensors:
                raise ValueError(f"load_bottleneck: missing tensor {key!r} in {WEIGHTS_NAME}")
            if tensors[key].shape != expected:
                raise ValueError(
                    f"load_bottleneck: {key} has shape {list(tensors[key].shape)} in the file, but the model's "
                    f"Adapter(dim={adapter.dim}, bottleneck={adapter.bottleneck}) {name!r} needs {list(expected)}"
                )
    if built:
        install_adapters(model, built)
    with torch.no_grad():
        for name, adapter in adapters.items():
            for param in _PARAMS:
                adapter.get_parameter(param).copy_(tensors[f"{name}.{param}"])
            adapter.scaling = float(records[name]["scaling"])
    return model
