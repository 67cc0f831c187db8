"""Save and load LoRA adapters in Hugging Face PEFT's on-disk format (safetensors + JSON, never pickle).

A directory holds one adapter per folder, as PEFT's save_pretrained writes them: adapter "default"
at the root, every other adapter in a sub-folder named after it. Each folder has

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight / .lora_B.weight
                                (Linear, Conv1D, Conv2d) and base_model.model.<module>.lora_embedding_A /
                                .lora_embedding_B (Embedding), in our layouts, which are PEFT's; a DoRA
                                adapter adds base_model.model.<module>.lora_magnitude_vector (m)
    adapter_config.json         peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, use_rslora,
                                use_dora, ...

so `peft.PeftModel.from_pretrained(base_model, directory)` (and `load_adapter(directory/<name>,
adapter_name=<name>)`) read what save_lora writes, and load_lora reads what PEFT's
`save_pretrained` writes, including the base_layer weights PEFT adds for a targeted embed_tokens
(they are loaded into the layer's weight, as PEFT does). A PiSSA adapter is written as a plain
LoRA delta on the original weight, as PEFT's path_initial_model_for_weight_conversion does:
A' = [A; A0], B' = [B, −B0], r' = 2r, alpha' = 2·alpha (√2·alpha with rsLoRA), so the scaling
and s·B'·A' = s·(B·A − B0·A0) are those of the trained adapter.

adapter_config.json is read against an allow-list: every key of PEFT 0.21's LoraConfig is either
honoured (r, lora_alpha, lora_dropout, rank_pattern, alpha_pattern, use_rslora, use_dora, init_lora_weights
True / False / "gaussian" / "orthogonal" / "eva" (initial values only) or "pissa" (the base is
converted to its residual first, as PEFT does)), descriptive (which modules and what model: the
weights say which modules get the adapter), or accepted only at the value that means "not used"
(PEFT's default, None, false or empty). Anything else, and any unknown key that is not None,
false or empty, is refused with the key's name and the file's path.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import torch
from torch import nn

from lowrank._files import read_json, read_tensors, write_tensors
from lowrank.nn.lora import (
    DEFAULT_ADAPTER,
    LoRAConv1D,
    LoRAEmbedding,
    LoRALayer,
    check_adapter_name,
    check_lora_hyperparameters,
    is_pissa,
)
from lowrank.tuners.lora.model import (
    LoRAConfig,
    adapter_names,
    add_lora_adapter,
    check_lora_targets,
    lora_class_for,
    lora_layers,
)

__all__ = ["save_lora", "load_lora"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
    r"|base_layer\.weight|base_layer\.bias)"
)

# adapter_config.json keys that describe the adapter without changing what it computes.
_DESCRIPTIVE = {
    "task_type", "base_model_name_or_path", "revision", "peft_version", "auto_mapping", "inference_mode",
    # which modules: the weights say, and the adapter goes on exactly those
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "fan_in_fan_out",  # PEFT sets it per layer type, as our Conv1D layer's layout does
    "eva_config",  # settings of the data-driven EVA init, which loading does not run
}  # fmt: skip
_HONOURED = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "rank_pattern", "alpha_pattern", "use_rslora", "init_lora_weights",
    "use_dora",
}  # fmt: skip
# PEFT features lowrank does not implement: key -> PEFT's default, the value that means "not used".
_UNUSED_ONLY = {
    "bias": "none", "modules_to_save": None, "lora_bias": False, "layer_replication": None,
    "trainable_token_indices": None, "target_parameters": None, "megatron_config": None,
    "megatron_core": "megatron.core", "loftq_config": {}, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}  # fmt: skip
# init_lora_weights values that only choose initial values, which the loaded weights replace.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _is_unused(value, default=None) -> bool:
    return value is None or value is False or value == default or (isinstance(value, (list, dict)) and not value)


def _keys_for(name: str, layer) -> tuple[str, str]:
    if isinstance(layer, nn.Embedding):
        return f"{_PREFIX}{name}.lora_embedding_A", f"{_PREFIX}{name}.lora_embedding_B"
    return f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"


def _magnitude_key(name: str) -> str:
    return f"{_PREFIX}{name}.lora_magnitude_vector"  # PEFT's file key: no adapter name, no ".weight"


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a trailing run of name parts (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _json_number(value: float):
    return int(value) if float(value).is_integer() else float(value)


def _saved_factors(layer: LoRALayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, r, alpha) as written to disk: a PiSSA adapter as its delta on the original weight."""
    adapter = layer.lora_adapters[adapter_name]
    lora_A, lora_B = (t.detach() for t in layer.lora_parameters(adapter_name))
    if not is_pissa(adapter.init_lora_weights):
        return lora_A, lora_B, adapter.r, adapter.alpha
    initial_A, initial_B = layer.pissa_initial(adapter_name)
    alpha = adapter.alpha * (math.sqrt(2) if adapter.use_rslora else 2)  # keeps the scaling at rank 2r
    return torch.cat([lora_A, initial_A]), torch.cat([lora_B, -initial_B], dim=1), 2 * adapter.r, alpha


def _save_one(model: nn.Module, adapter_name: str, directory: str) -> None:
    layers = {name: layer for name, layer in lora_layers(model).items() if adapter_name in layer.lora_adapters}
    saved = {name: _saved_factors(layer, adapter_name) for name, layer in layers.items()}
    record = getattr(model, "lora_configs", {}).get(adapter_name)
    if record is None:  # layers built by hand: take the most common settings as the defaults
        adapters = [layer.lora_adapters[adapter_name] for layer in layers.values()]
        settings = Counter((a.r, a.alpha, a.dropout, a.use_rslora, a.use_dora) for a in adapters).most_common(1)[0][0]
        record = LoRAConfig(*settings[:3], use_rslora=settings[3], use_dora=settings[4])
    default_r, default_alpha = record.r, record.alpha
    if is_pissa(record.init_lora_weights):
        default_r, default_alpha = 2 * record.r, record.alpha * (math.sqrt(2) if record.use_rslora else 2)

    tensors = {}
    for name, layer in layers.items():
        key_A, key_B = _keys_for(name, layer)
        tensors[key_A], tensors[key_B] = (t.contiguous() for t in saved[name][:2])
        if layer.lora_adapters[adapter_name].use_dora:
            tensors[_magnitude_key(name)] = layer.dora_magnitude(adapter_name).detach().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": default_r,
        "lora_alpha": _json_number(default_alpha),
        "lora_dropout": record.dropout,
        "target_modules": sorted(layers),
        # Layers whose rank or alpha differs from the defaults, keyed by full module name.
        "rank_pattern": {name: r for name, (_, _, r, _) in saved.items() if r != default_r},
        "alpha_pattern": {name: _json_number(a) for name, (_, _, _, a) in saved.items() if a != default_alpha},
        "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for layer in layers.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": record.use_rslora,
        "use_dora": record.use_dora,
        "inference_mode": True,
    }
    os.makedirs(directory, exist_ok=True)
    write_tensors(os.path.join(directory, WEIGHTS_NAME), tensors)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def save_lora(model: nn.Module, directory: str | os.PathLike, *, selected_adapters=None) -> None:
    """Write the LoRA weights and a PEFT LoraConfig of every adapter (or of `selected_adapters`) into
    `directory`: adapter "default" at its root, the others in sub-folders named after them (PEFT's layout)."""
    directory = os.fspath(directory)
    known = adapter_names(model)
    if not known:
        raise ValueError("save_lora: the model has no LoRA layers; call inject_lora first")
    names = known if selected_adapters is None else list(selected_adapters)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"save_lora: the model has no LoRA adapter(s) {unknown}; it has {known}")
    for name in names:
        _save_one(model, name, directory if name == DEFAULT_ADAPTER else os.path.join(directory, name))


def _adapter_directory(directory: str, adapter_name: str) -> str:
    """Where adapter `adapter_name` of a PEFT save lives: its sub-folder, else the directory itself."""
    sub_folder = os.path.join(directory, adapter_name)
    if adapter_name != DEFAULT_ADAPTER and os.path.isfile(os.path.join(sub_folder, CONFIG_NAME)):
        return sub_folder
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return directory
    found = sorted(
        entry for entry in (os.listdir(directory) if os.path.isdir(directory) else [])
        if os.path.isfile(os.path.join(directory, entry, CONFIG_NAME))
    )  # fmt: skip
    raise FileNotFoundError(
        f"load_lora: no {CONFIG_NAME} in {directory}"
        + (f" or {sub_folder}" if adapter_name != DEFAULT_ADAPTER else "")
        + (f"; its sub-folders hold the adapters {found} (pass adapter_name=...)" if found else "")
    )


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    config = read_json(path, "load_lora")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"load_lora: {path}: peft_type {config.get('peft_type')!r} is not supported; only 'LORA' adapters load"
        )
    for key, value in config.items():
        if key in _DESCRIPTIVE or key in _HONOURED:
            continue
        if key in _UNUSED_ONLY:
            if not _is_unused(value, _UNUSED_ONLY[key]):
                raise ValueError(
                    f"load_lora: {path}: {key}={value!r} is a PEFT feature lowrank does not implement "
                    f"(it loads only unused: {_UNUSED_ONLY[key]!r}, None, false or empty)"
                )
        elif not _is_unused(value):
            raise ValueError(f"load_lora: {path}: unknown key {key}={value!r}; lowrank cannot honour it")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS and init != "pissa":
        why = (
            "the randomised SVD's residual weight cannot be rebuilt; save the adapter converted to LoRA "
            "(PEFT: path_initial_model_for_weight_conversion; lowrank's save_lora does it)"
            if is_pissa(init)
            else "it changes the base weight or the layer in a way lowrank does not implement"
        )
        raise ValueError(f"load_lora: {path}: init_lora_weights={init!r} is not supported: {why}")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"load_lora: {path}: {key} must be true or false, got {config[key]!r}")
    return config


def _read_weights(directory: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {key: tensor}} from the safetensors file."""
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
                f"load_lora: {path}: unexpected key {key!r}; expected {_PREFIX}<module>.lora_A.weight / lora_B.weight"
            )
        by_module.setdefault(match["module"], {})[key] = tensor
    return by_module


def _check_tensor(path: str, key: str, found: dict, shape, owner: str) -> None:
    if key not in found:
        raise ValueError(f"load_lora: {path}: missing key {key!r} (the adapter has {sorted(found)})")
    if tuple(found[key].shape) != tuple(shape):
        raise ValueError(
            f"load_lora: {key} has shape {tuple(found[key].shape)} in the adapter, but the model's {owner} needs "
            f"{tuple(shape)}"
        )


def load_lora(
    model: nn.Module, directory: str | os.PathLike, backend=None, *, adapter_name: str = DEFAULT_ADAPTER
) -> nn.Module:
    """Load an adapter saved by save_lora or by PEFT into `model` as adapter `adapter_name` and return it.

    The adapter is read from directory/<adapter_name> when that sub-folder holds one (PEFT's layout for
    adapters other than "default"), else from `directory`. When the model has no adapter of that name,
    it is added on exactly the modules the file has weights for, with r / alpha / dropout / rsLoRA from
    its config (modules that are not LoRA layers yet become ones; like inject_lora, the model's first
    adapter is active and later ones are added inactive). When it has one, those layers must be exactly
    the file's modules, and the file's values (tensors, alpha, dropout, rsLoRA) replace theirs.
    Everything is checked before anything changes.
    """
    check_adapter_name("load_lora", adapter_name)
    directory = _adapter_directory(os.fspath(directory), adapter_name)
    config = _read_config(directory)
    weights = _read_weights(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    # Missing fields take PEFT's LoraConfig defaults.
    default_r, default_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    dropout = float(config.get("lora_dropout", 0.0))
    use_rslora, use_dora = config.get("use_rslora", False), config.get("use_dora", False)
    init = "pissa" if config.get("init_lora_weights", True) == "pissa" else True
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    hyperparameters = {
        name: (_pattern_value(rank_pattern, name, default_r), _pattern_value(alpha_pattern, name, default_alpha))
        for name in weights
    }

    holders = {name: layer for name, layer in lora_layers(model).items() if adapter_name in layer.lora_adapters}
    modules = {}
    for name in sorted(weights):
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_lora: the adapter has weights for module {name!r}, which the model lacks") from None
    if holders:
        merged = [name for name, layer in holders.items() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(
                f"load_lora: adapter {adapter_name!r} is merged into the base weights of {merged[:3]}; "
                "call unmerge_lora first"
            )
        missing = sorted(set(holders) - set(weights))
        if missing:
            raise ValueError(f"load_lora: the adapter has no weights for the model's LoRA layers {missing}")
        other_kind = [name for name, layer in holders.items() if layer.lora_adapters[adapter_name].use_dora != use_dora]
        if other_kind:
            raise ValueError(
                f"load_lora: {path}: use_dora={use_dora}, but adapter {adapter_name!r} of {other_kind[:3]} "
                f"{'is not' if use_dora else 'is'} a DoRA adapter"
            )
        converted = [name for name, layer in holders.items()
                     if is_pissa(layer.lora_adapters[adapter_name].init_lora_weights) != (init == "pissa")]  # fmt: skip
        if converted:
            raise ValueError(
                f"load_lora: {path}: init_lora_weights={config.get('init_lora_weights', True)!r}, but adapter "
                f"{adapter_name!r} of {converted[:3]} was {'not ' if init == 'pissa' else ''}made with PiSSA, so its "
                "base weight is not the one these tensors go with"
            )
        extra = sorted(set(weights) - set(holders))
        if extra:
            raise ValueError(
                f"load_lora: the adapter has weights for {extra}, which are not LoRA layers with adapter "
                f"{adapter_name!r} in the model"
            )

    # Check everything before changing anything, so a failed load leaves the model as it was.
    options = {"use_rslora": use_rslora, "init_lora_weights": init, "use_dora": use_dora}
    for name, module in modules.items():
        r, alpha = hyperparameters[name]
        check_lora_hyperparameters(f"load_lora ({name})", r, alpha, dropout)
        if not holders:
            check_lora_targets(model, [name], adapter_name, r, alpha, dropout, options)
        if name in holders and r != module.lora_adapters[adapter_name].r:
            raise ValueError(
                f"load_lora: the adapter config gives {name!r} r={r}, but its adapter {adapter_name!r} has "
                f"r={module.lora_adapters[adapter_name].r}"
            )
        # _adapter_shapes reads only the base layer's own attributes (in_features, nf, num_embeddings, ...).
        lora_class = type(module) if isinstance(module, LoRALayer) else lora_class_for(name, module)
        owner = f"{lora_class.__name__} {name!r}"
        shape_A, shape_B = lora_class._adapter_shapes(module, r)
        for key, shape in zip(_keys_for(name, module), (shape_A, shape_B)):
            _check_tensor(path, key, weights[name], shape, owner)
        if use_dora:
            _check_tensor(path, _magnitude_key(name), weights[name], shape_B[:1], owner)
        elif _magnitude_key(name) in weights[name]:
            raise ValueError(
                f"load_lora: {path}: {_magnitude_key(name)!r} is a DoRA magnitude, but the config has use_dora=false"
            )
        for param_name in ("weight", "bias"):
            key = f"{_PREFIX}{name}.base_layer.{param_name}"
            if key in weights[name]:
                _check_tensor(path, key, weights[name], getattr(module, param_name).shape, owner)

    if not holders:
        for name in modules:
            r, alpha = hyperparameters[name]
            add_lora_adapter(model, [name], adapter_name, r, alpha, dropout, backend, **options)
    layers = {name: model.get_submodule(name) for name in modules}
    with torch.no_grad():
        for name, layer in layers.items():
            found = weights[name]
            for param_name in ("weight", "bias"):  # PEFT's save of a targeted embedding carries its base weights
                key = f"{_PREFIX}{name}.base_layer.{param_name}"
                if key in found:
                    getattr(layer, param_name).copy_(found[key])
            keys = [*_keys_for(name, layer), *([_magnitude_key(name)] if use_dora else [])]
            for param, key in zip(layer.adapter_parameters(adapter_name), keys, strict=True):
                param.copy_(found[key])
            adapter = layer.lora_adapters[adapter_name]
            adapter.alpha, adapter.use_rslora = hyperparameters[name][1], use_rslora
            if not isinstance(layer, LoRAEmbedding):  # embeddings have no dropout
                adapter.dropout = dropout
    model.lora_configs = {
        **getattr(model, "lora_configs", {}),
        adapter_name: LoRAConfig(default_r, default_alpha, dropout, sorted(modules), **options),
    }
    return model
