"""Model surgery: replace chosen layers of an existing model with LoRA layers, in place.

`target_modules` picks the layers, with HF PEFT's rules:

    list of str    a module is targeted when its full name equals an entry or ends with
                   "." + entry ("query" hits "encoder.layer.0.attention.self.query")
    str            a regular expression that must match the full module name (re.fullmatch)
    "all-linear"   every nn.Linear and transformers Conv1D except the output head, which is
                   the module returned by model.get_output_embeddings() (Hugging Face models)
                   and any module whose own name is "lm_head"

Supported layers: nn.Linear, nn.Embedding, transformers' Conv1D and nn.Conv2d (groups=1);
dropout applies to all but embeddings (a lookup has no input features to drop).
Like loralib, only the replaced layers' weights are frozen; call mark_only_lora_trainable to
freeze everything but LoRA, as PEFT does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from lowrank.nn.lora import (
    LoRAConv1D,
    LoRAConv2d,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    check_lora_hyperparameters,
    is_hf_conv1d,
)

__all__ = [
    "LoRAConfig", "inject_lora", "merge_lora", "unmerge_lora", "merge_and_unload_lora", "mark_only_lora_trainable",
    "lora_layers",
]

ALL_LINEAR = "all-linear"
_SUPPORTED = "nn.Linear, nn.Embedding, transformers Conv1D, nn.Conv2d"
_CANDIDATES_SHOWN = 10


@dataclass
class LoRAConfig:
    """What inject_lora did, kept on the model as `model.lora_config`; save_lora writes it out.

    r, alpha and dropout are those of the first injection; modules injected later with other
    values keep their own (save_lora records those as PEFT rank/alpha patterns).
    """

    r: int
    alpha: float
    dropout: float
    target_modules: list[str] = field(default_factory=list)  # full names of the layers given LoRA


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer in `model`, by full module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALayer)}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def _output_head_names(model: nn.Module) -> set[str]:
    names = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"}
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    if head is not None:
        names |= {name for name, module in model.named_modules() if module is head}
    return names


def _select_targets(model: nn.Module, target_modules) -> list[str]:
    named = [(name, module) for name, module in model.named_modules() if name]  # the root cannot be replaced
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = _output_head_names(model)
        return [name for name, module in named if _is_linear(module) and name not in head]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return [name for name, _ in named if pattern.fullmatch(name)]
    if (
        isinstance(target_modules, (list, tuple, set, frozenset))
        and target_modules
        and all(isinstance(t, str) and t for t in target_modules)
    ):
        return [name for name, _ in named if any(name == t or name.endswith("." + t) for t in target_modules)]
    raise TypeError(
        "inject_lora: target_modules must be a non-empty list of module names (full names or '.'-suffixes), "
        f"a regular expression string, or {ALL_LINEAR!r}; got {target_modules!r}"
    )


def _no_match_error(model: nn.Module, target_modules) -> ValueError:
    supported = [
        name
        for name, module in model.named_modules()
        if name and (isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)) or is_hf_conv1d(module))
    ]
    last_parts = sorted({name.rsplit(".", 1)[-1] for name in supported})
    shown = ", ".join(supported[:_CANDIDATES_SHOWN]) + (", ..." if len(supported) > _CANDIDATES_SHOWN else "")
    return ValueError(
        f"inject_lora: target_modules={target_modules!r} matched no module. "
        f"Supported layers in this model include: {shown or '(none)'}; their last name parts: {last_parts}"
    )


def _lora_layer_for(name: str, module: nn.Module, r, alpha, dropout, backend) -> LoRALayer:
    if isinstance(module, LoRALayer):
        raise ValueError(f"inject_lora: module {name!r} already has LoRA ({type(module).__name__})")
    if module._forward_hooks or module._forward_pre_hooks or dict(module.named_children()):
        # Replacing the module would silently drop its hooks and children (e.g. a bottleneck
        # adapter registered on it by inject_bottleneck).
        raise ValueError(
            f"inject_lora: module {name!r} carries forward hooks or child modules (a bottleneck adapter?) "
            "that replacing it would drop; inject LoRA before adding adapters or hooks there"
        )
    try:
        if isinstance(module, nn.Linear):
            return LoRALinear.from_linear(module, r, alpha, dropout, backend=backend)
        if is_hf_conv1d(module):
            return LoRAConv1D.from_conv1d(module, r, alpha, dropout, backend=backend)
        if isinstance(module, nn.Embedding):
            return LoRAEmbedding.from_embedding(module, r, alpha)
        if isinstance(module, nn.Conv2d):
            return LoRAConv2d.from_conv2d(module, r, alpha, dropout)
    except ValueError as exc:
        raise ValueError(f"inject_lora: cannot add LoRA to {name!r}: {exc}") from exc
    raise ValueError(f"inject_lora: module {name!r} is a {type(module).__name__}; supported layers are {_SUPPORTED}")


def make_lora_layers(model: nn.Module, names: list[str], r, alpha, dropout, backend=None) -> dict[str, LoRALayer]:
    """LoRA layers for the modules with these exact full names, sharing their weights; not yet installed."""
    return {name: _lora_layer_for(name, model.get_submodule(name), r, alpha, dropout, backend) for name in names}


def install_lora_layers(model: nn.Module, layers: dict[str, LoRALayer]) -> None:
    """Put each layer in place of the module of the same full name."""
    for name, layer in layers.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)


def inject_lora(model: nn.Module, target_modules, r=8, alpha=16, dropout=0.0, backend=None) -> nn.Module:
    """Replace the targeted layers of `model` by LoRA layers in place and return `model`.

    Raises ValueError when nothing matches (listing candidate names), when a matched module is
    of an unsupported type, or when it already has LoRA.
    """
    check_lora_hyperparameters("inject_lora", r, alpha, dropout)
    names = _select_targets(model, target_modules)
    if not names:
        raise _no_match_error(model, target_modules)
    # Build every layer before installing any, so a failure leaves the model's structure as it was.
    install_lora_layers(model, make_lora_layers(model, names, r, alpha, dropout, backend))
    record = getattr(model, "lora_config", None)
    if record is None:
        model.lora_config = LoRAConfig(r, alpha, float(dropout), names)
    else:
        record.target_modules.extend(names)
    return model


def _require_lora_layers(caller: str, model: nn.Module) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{caller}: the model has no LoRA layers; call inject_lora first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (for inference at base-model cost)."""
    for layer in _require_lora_layers("merge_lora", model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora."""
    for layer in _require_lora_layers("unmerge_lora", model).values():
        layer.unmerge()
    return model


def merge_and_unload_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the plain base layer back in its place."""
    merge_lora(model)
    for name, layer in lora_layers(model).items():
        if isinstance(layer, LoRALinear):
            base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        elif isinstance(layer, LoRAConv2d):
            base = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
        elif isinstance(layer, LoRAEmbedding):
            base = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, layer.max_norm,
                                layer.norm_type, layer.scale_grad_by_freq, layer.sparse, device="meta")
        elif isinstance(layer, LoRAConv1D):
            from transformers.pytorch_utils import Conv1D

            base = Conv1D(layer.nf, layer.nx)
        else:
            raise TypeError(f"merge_and_unload_lora: no base layer known for {name!r} ({type(layer).__name__})")
        base.weight = layer.weight
        if getattr(layer, "bias", None) is not None:
            base.bias = layer.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def mark_only_lora_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze every parameter except LoRA's (loralib / PEFT semantics).

    bias: "none" freezes all biases, "all" trains every parameter named `bias`, "lora_only"
    trains the biases of the LoRA layers only.
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"mark_only_lora_trainable: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    layers = _require_lora_layers("mark_only_lora_trainable", model)
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)
    elif bias == "lora_only":
        for layer in layers.values():
            if getattr(layer, "bias", None) is not None:
                layer.bias.requires_grad_(True)
    return model
