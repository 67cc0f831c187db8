"""Model surgery: replace chosen layers of an existing model with LoRA layers, in place, and manage
their named adapters.

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
freeze everything but the active adapters, as PEFT does.

Named adapters, with PEFT's semantics (see lowrank.nn.lora for how a layer holds them):

    inject_lora(model, targets, ..., adapter_name="x")   adds adapter "x" to the targeted layers (LoRA layers
                                                         already there get it beside their others); a model's
                                                         first adapter is active, later ones are added
                                                         inactive and frozen
    set_adapter(model, "x" or ["x", "y"])                 the active adapters (trainable; the others frozen);
                                                         merged layers are unmerged first; at most one DoRA
                                                         adapter per layer
    with disable_adapters(model): ...                     the base model (merged layers unmerged, and merged
                                                         again on exit); PiSSA's residual weights get their
                                                         initial part back, so this is the original model
    with adapter_batch(model, ["x", "__base__", "y"]):    each batch row through its own adapter (PEFT's
        model(batch)                                      adapter_names), in inference and in training
    delete_adapter(model, "x")                            not while merged
    add_weighted_adapter(model, ["x", "y"], [w1, w2], "xy", combination_type="svd" | "cat" | "linear")

add_weighted_adapter follows PEFT's LoraModel.add_weighted_adapter: the new adapter has r (and
alpha) = the sources' common r ("linear"), their sum ("cat") or svd_rank / their largest ("svd"),
the first source's dropout, and sits on every layer that has any source; "cat" stacks
weight·scaling·A over B (exact), "svd" takes the top-r SVD of Σ weight·scaling·B·A (exact up to
the rank), "linear" mixes A's and B's with ±√|weight·scaling| (an approximation). It is added
inactive and frozen. Unlike PEFT it refuses an existing name instead of returning silently, and
the new adapter never uses rsLoRA (PEFT copies use_rslora from the first source while setting
alpha = r, which scales the result by √r), and PiSSA and DoRA sources are refused (PEFT drops a DoRA
source's trained magnitude).

adapter_batch follows PEFT's mixed-batch inference (adapter_names=[...]): one adapter name per row
of the batch, the leading dimension of every LoRA layer's input; "__base__" for the base model;
the active adapters do not matter; a layer without a row's adapter gives that row its base output.
It refuses what PEFT refuses (names the model lacks, merged layers, DoRA adapters) and PiSSA
layers, and, unlike PEFT, also trains: each adapter gets the gradients of its own rows (they
train when they require grad: set_adapter(model, names) makes several trainable). Linear and
Conv1D layers run one fused lowrank.ops.multi_lora_linear call for the whole batch.

model.lora_configs (adapter name -> LoRAConfig) records what inject_lora did; save_lora writes it.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from lowrank import _backends
from lowrank.nn.lora import (
    DEFAULT_ADAPTER,
    LoRAConv1D,
    LoRAConv2d,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    RowAdapters,
    check_adapter_name,
    check_lora_hyperparameters,
    is_hf_conv1d,
    is_pissa,
    pissa_iterations,
)

__all__ = [
    "LoRAConfig", "inject_lora", "merge_lora", "unmerge_lora", "merge_and_unload_lora", "mark_only_lora_trainable",
    "lora_layers", "set_adapter", "active_adapters", "disable_adapters", "adapter_batch", "delete_adapter",
    "add_weighted_adapter", "BASE_ROWS",
]

ALL_LINEAR = "all-linear"
BASE_ROWS = "__base__"  # adapter_batch's name for rows without an adapter (PEFT's)
COMBINATION_TYPES = ("linear", "cat", "svd")
_SUPPORTED = "nn.Linear, nn.Embedding, transformers Conv1D, nn.Conv2d"
_CANDIDATES_SHOWN = 10


@dataclass
class LoRAConfig:
    """What inject_lora did for one adapter, kept in `model.lora_configs[adapter_name]`; save_lora writes it.

    r, alpha and dropout are those of the adapter's first injection; modules injected later with
    other values keep their own (save_lora records those as PEFT rank/alpha patterns).
    """

    r: int
    alpha: float
    dropout: float
    target_modules: list[str] = field(default_factory=list)  # full names of the layers given the adapter
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer in `model`, by full module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter in `model`, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora_adapters))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The model's active adapters (set_adapter keeps every layer's list the same)."""
    layers = lora_layers(model)
    return list(next(iter(layers.values())).active_adapters) if layers else []


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoRAConv1D)) or is_hf_conv1d(module)


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
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(
                f"inject_lora: target_modules {target_modules!r} is not a valid regular expression: {exc}"
            ) from None
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


def lora_class_for(name: str, module: nn.Module) -> type[LoRALayer]:
    if module._forward_hooks or module._forward_pre_hooks or dict(module.named_children()):
        # Replacing the module would silently drop its hooks and children (e.g. a bottleneck
        # adapter registered on it by inject_bottleneck).
        raise ValueError(
            f"inject_lora: module {name!r} carries forward hooks or child modules (a bottleneck adapter?) "
            "that replacing it would drop; inject LoRA before adding adapters or hooks there"
        )
    for lora_class, matches in (
        (LoRALinear, isinstance(module, nn.Linear)),
        (LoRAConv1D, is_hf_conv1d(module)),
        (LoRAEmbedding, isinstance(module, nn.Embedding)),
        (LoRAConv2d, isinstance(module, nn.Conv2d)),
    ):
        if matches:
            return lora_class
    raise ValueError(f"inject_lora: module {name!r} is a {type(module).__name__}; supported layers are {_SUPPORTED}")


def _lora_layer_for(name: str, module: nn.Module, r, alpha, dropout, backend, adapter_name, options) -> LoRALayer:
    lora_class = lora_class_for(name, module)
    try:
        if lora_class is LoRALinear:
            return LoRALinear.from_linear(module, r, alpha, dropout, backend, adapter_name=adapter_name, **options)
        if lora_class is LoRAConv1D:
            return LoRAConv1D.from_conv1d(module, r, alpha, dropout, backend, adapter_name=adapter_name, **options)
        if lora_class is LoRAEmbedding:
            return LoRAEmbedding.from_embedding(module, r, alpha, adapter_name=adapter_name, **options)
        return LoRAConv2d.from_conv2d(module, r, alpha, dropout, adapter_name=adapter_name, **options)
    except ValueError as exc:
        raise ValueError(f"inject_lora: cannot add LoRA to {name!r}: {exc}") from exc


def check_lora_targets(model: nn.Module, names: list[str], adapter_name, r, alpha, dropout, options) -> None:
    """Everything that could make adding the adapter to these modules fail, checked before anything changes."""
    for name in names:
        module = model.get_submodule(name)
        try:
            if isinstance(module, LoRALayer):
                module.check_new_adapter(adapter_name, r, alpha, dropout, **options)
                continue
            lora_class = lora_class_for(name, module)
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ValueError(f"LoRAConv2d: only groups=1 convolutions are supported, got groups={module.groups}")
            lora_class.check_adapter_options(module.weight, [], adapter_name, r, alpha, dropout, **options)
        except ValueError as exc:
            message = str(exc)
            if message.startswith("inject_lora"):
                raise
            raise ValueError(f"inject_lora: cannot add LoRA to {name!r}: {message}") from exc


def make_lora_layers(
    model: nn.Module, names: list[str], r, alpha, dropout, backend=None, adapter_name=DEFAULT_ADAPTER, **options
) -> dict[str, LoRALayer]:
    """LoRA layers with one adapter for the modules with these exact full names, sharing their weights; not
    yet installed."""
    return {
        name: _lora_layer_for(name, model.get_submodule(name), r, alpha, dropout, backend, adapter_name, options)
        for name in names
    }


def install_lora_layers(model: nn.Module, layers: dict[str, LoRALayer]) -> None:
    """Put each layer in place of the module of the same full name."""
    for name, layer in layers.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)


def add_lora_adapter(
    model: nn.Module, names: list[str], adapter_name: str, r, alpha, dropout, backend=None, **options
) -> None:
    """Add adapter `adapter_name` to these modules (LoRA layers get it beside their others, other modules
    become LoRA layers), all checked before any changes. The model's first adapter becomes active; a later
    one joins inactive and frozen, and new layers take the model's active adapters and disabled state."""
    check_lora_targets(model, names, adapter_name, r, alpha, dropout, options)
    existing = lora_layers(model)
    first_adapter = not adapter_names(model)
    active = [adapter_name] if first_adapter else active_adapters(model)
    disabled = any(layer.adapters_disabled for layer in existing.values())
    plain = [name for name in names if name not in existing]
    new_layers = make_lora_layers(model, plain, r, alpha, dropout, backend, adapter_name, **options)
    for name in names:
        layer = new_layers.get(name) or existing[name]
        if name in existing:
            layer.add_adapter(adapter_name, r, alpha, dropout, **options)
        layer.active_adapters, layer.adapters_disabled = list(active), disabled
        for param in layer.adapter_parameters(adapter_name):
            param.requires_grad_(adapter_name in active)
    install_lora_layers(model, new_layers)


def inject_lora(
    model: nn.Module, target_modules, r=8, alpha=16, dropout=0.0, backend=None, *, adapter_name=DEFAULT_ADAPTER,
    use_rslora=False, init_lora_weights=True, use_dora=False,
) -> nn.Module:  # fmt: skip
    """Add LoRA adapter `adapter_name` to the targeted layers of `model` in place and return `model`.

    use_rslora: scaling alpha/√r instead of alpha/r. use_dora: DoRA (Linear and Conv1D only), through the
    fused dora_linear op; its magnitude starts at ‖W‖ of each output row. init_lora_weights: True (PEFT's default),
    "pissa" or "pissa_niter_K" (Linear / Conv1D: A and B from the top-r SVD of the weight, the
    residual left in it). A module that is not yet a LoRA layer becomes one (its backend is set then).

    Raises ValueError when nothing matches (listing candidate names), when a matched module is of an
    unsupported type or already has this adapter; nothing changes then.
    """
    check_adapter_name("inject_lora", adapter_name)
    check_lora_hyperparameters("inject_lora", r, alpha, dropout)
    _backends.check_name("inject_lora", backend)
    if init_lora_weights is not True:
        pissa_iterations(init_lora_weights)
    configs = getattr(model, "lora_configs", {})
    record = configs.get(adapter_name)
    for option, value in (("use_rslora", use_rslora), ("use_dora", use_dora)):
        if record is not None and getattr(record, option) != value:
            raise ValueError(
                f"inject_lora: adapter {adapter_name!r} was injected with {option}={getattr(record, option)}; "
                f"PEFT's config has one {option} per adapter, use another adapter_name"
            )
    names = _select_targets(model, target_modules)
    if not names:
        raise _no_match_error(model, target_modules)
    options = {"use_rslora": use_rslora, "init_lora_weights": init_lora_weights, "use_dora": use_dora}
    add_lora_adapter(model, names, adapter_name, r, alpha, dropout, backend, **options)
    if record is None:
        model.lora_configs = {
            **configs, adapter_name: LoRAConfig(r, alpha, float(dropout), names, **options)
        }
    else:
        record.target_modules.extend(names)
    return model


def _require_lora_layers(caller: str, model: nn.Module) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{caller}: the model has no LoRA layers; call inject_lora first")
    return layers


def _require_adapters(caller: str, model: nn.Module, names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{caller}: the model has no LoRA adapter(s) {unknown}; it has {known}")
    return names


def set_adapter(model: nn.Module, adapter_names) -> nn.Module:
    """Make these adapters (a name or a list) the active ones: they run in forward and train, every
    other adapter is frozen (PEFT's set_adapter). Merged layers are unmerged first, as in PEFT."""
    layers = _require_lora_layers("set_adapter", model)
    names = _require_adapters("set_adapter", model, adapter_names)
    for name, layer in layers.items():
        try:
            layer.check_active_adapters(names)
        except ValueError as exc:
            raise ValueError(f"set_adapter: {name!r}: {exc}") from None
    for layer in layers.values():
        layer.unmerge()
        layer.set_adapter(names)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model inside the `with` block (e.g. a DPO reference model): merged layers are unmerged
    on entry and merged again on exit; a PiSSA adapter's residual weight gets its initial part back."""
    layers = _require_lora_layers("disable_adapters", model)
    before = {name: (list(layer.merged_adapters), layer.adapters_disabled) for name, layer in layers.items()}
    for layer in layers.values():
        layer.unmerge()
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for name, layer in layers.items():
            merged, layer.adapters_disabled = before[name]
            layer.merge(merged)


def _row_names(adapter_names) -> list[str]:
    if isinstance(adapter_names, (list, tuple)) and all(isinstance(name, str) for name in adapter_names):
        return list(adapter_names)
    raise TypeError(
        f"adapter_batch: adapter_names must be a list of str, one adapter name (or {BASE_ROWS!r}) per batch row, "
        f"got {adapter_names!r}"
    )


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names):
    """Run each row of the batch through its own adapter inside the `with` block: adapter_names[i] (or
    "__base__") for row i, the leading dimension of every LoRA layer's input (PEFT's adapter_names)."""
    layers = _require_lora_layers("adapter_batch", model)
    rows = _row_names(adapter_names)
    used = _require_adapters("adapter_batch", model, list(dict.fromkeys(name for name in rows if name != BASE_ROWS)))
    for name, layer in layers.items():
        try:
            layer.check_mixed_batch(used)
        except ValueError as exc:
            raise ValueError(f"adapter_batch: {name!r}: {exc}") from None
    positions = {name: position for position, name in enumerate(used)}
    row_positions = torch.tensor([positions.get(name, -1) for name in rows], dtype=torch.long)
    before = {name: layer.row_adapters for name, layer in layers.items()}
    for layer in layers.values():
        here = tuple(name for name in used if name in layer.lora_adapters)
        # the model's adapter positions -> this layer's (-1 where it lacks the adapter); the last entry serves -1
        to_layer = torch.tensor([here.index(name) if name in here else -1 for name in used] + [-1], dtype=torch.long)
        layer.row_adapters = RowAdapters(here, to_layer[row_positions])
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.row_adapters = before[name]


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter from every layer (refused while it is merged). When it was the only active one,
    the first remaining adapter (by name) becomes active with a warning, as in PEFT."""
    layers = _require_lora_layers("delete_adapter", model)
    _require_adapters("delete_adapter", model, adapter_name)
    merged = [name for name, layer in layers.items() if layer.merged]
    was_active = adapter_name in active_adapters(model)
    if merged and (was_active or any(adapter_name in layers[name].merged_adapters for name in merged)):
        raise ValueError(
            f"delete_adapter: layers {merged[:3]} are merged and {adapter_name!r} is active or merged; "
            "unmerge_lora first"
        )
    active = [name for name in active_adapters(model) if name != adapter_name]
    for layer in layers.values():
        if adapter_name in layer.lora_adapters:
            layer.delete_adapter(adapter_name)
    remaining = sorted(adapter_names(model))
    if was_active and not active and remaining:
        active = remaining[:1]
        warnings.warn(f"delete_adapter: adapter {adapter_name!r} was the active one; {active[0]!r} is active now")
    if was_active:
        for layer in layers.values():
            layer.set_adapter(active)
    getattr(model, "lora_configs", {}).pop(adapter_name, None)
    return model


def _weighted_factors(layer: LoRALayer, sources, combination_type, rank) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's (A, B) on one layer from the sources it has: [(name, weight), ...]."""
    shape_A, shape_B = layer._adapter_shapes(rank)
    dtype = layer._compute_dtype()
    factors = [(*(t.detach().to(dtype) for t in layer.lora_parameters(name)), weight) for name, weight in sources]
    scalings = [layer.lora_adapters[name].scaling for name, _ in sources]
    if combination_type == "cat":
        new_A = torch.zeros(shape_A, dtype=dtype, device=layer.weight.device)
        new_B = torch.zeros(shape_B, dtype=dtype, device=layer.weight.device)
        stacked_A = torch.cat([A * (weight * s) for (A, _, weight), s in zip(factors, scalings)])
        stacked_B = torch.cat([B for _, B, _ in factors], dim=1)
        new_A[: stacked_A.shape[0]] = stacked_A
        new_B[:, : stacked_B.shape[1]] = stacked_B
        return new_A, new_B
    if combination_type == "linear":
        roots = [math.sqrt(abs(weight * s)) for (_, _, weight), s in zip(factors, scalings)]
        signs = [math.copysign(1.0, weight * s) for (_, _, weight), s in zip(factors, scalings)]
        new_A = sum(A * (root * sign) for (A, _, _), root, sign in zip(factors, roots, signs))
        new_B = sum(B * root for (_, B, _), root in zip(factors, roots))
        return new_A, new_B
    delta = sum(weight * s * (B.flatten(1) @ A.flatten(1)) for (A, B, weight), s in zip(factors, scalings))
    if rank > min(delta.shape):
        raise ValueError(f"add_weighted_adapter: svd rank {rank} exceeds the layer's delta shape {tuple(delta.shape)}")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    return Vh[:rank].reshape(shape_A), (U[:, :rank] @ torch.diag(S[:rank])).reshape(shape_B)


def add_weighted_adapter(
    model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
    svd_rank=None,
) -> nn.Module:  # fmt: skip
    """A new adapter `adapter_name` combining `adapters` with `weights` (PEFT's semantics, see the module docstring)."""
    caller = "add_weighted_adapter"
    layers = _require_lora_layers(caller, model)
    check_adapter_name(caller, adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"{caller}: the model already has an adapter {adapter_name!r}")
    adapters = _require_adapters(caller, model, adapters)
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"{caller}: give one weight per adapter, got adapters={adapters} and weights={weights}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"{caller}: combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    holders = {name: layer for name, layer in layers.items() if any(a in layer.lora_adapters for a in adapters)}
    pissa = sorted({a for layer in holders.values() for a in adapters if a in layer.lora_adapters
                    and is_pissa(layer.lora_adapters[a].init_lora_weights)})  # fmt: skip
    if pissa:
        raise ValueError(f"{caller}: PiSSA adapters {pissa} change the base weight; save and load them as plain LoRA")
    dora = sorted({a for layer in holders.values() for a in adapters if a in layer.lora_adapters
                   and layer.lora_adapters[a].use_dora})  # fmt: skip
    if dora:
        raise ValueError(
            f"{caller}: DoRA adapters {dora} have trained magnitudes that a combination of A's and B's cannot "
            "carry (PEFT 0.21 drops them: its combination is a DoRA adapter with the magnitude reset to ‖W‖_row "
            "when the first source is DoRA, a plain LoRA adapter otherwise)"
        )
    ranks = [max(layer.lora_adapters[a].r for layer in holders.values() if a in layer.lora_adapters) for a in adapters]
    combination_type = "linear" if len(adapters) == 1 else combination_type
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise ValueError(f"{caller}: combination_type='linear' needs adapters of one rank, got r={ranks}")
    rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
    first_record = getattr(model, "lora_configs", {}).get(adapters[0])
    dropout = first_record.dropout if first_record else next(
        layer.lora_adapters[adapters[0]].dropout for layer in holders.values() if adapters[0] in layer.lora_adapters
    )
    new_factors = {}
    for name, layer in holders.items():
        sources = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_adapters]
        new_factors[name] = _weighted_factors(layer, sources, combination_type, rank)
    add_lora_adapter(model, list(holders), adapter_name, rank, rank, dropout)
    with torch.no_grad():
        for name, layer in holders.items():
            for param, value in zip(layer.lora_parameters(adapter_name), new_factors[name]):
                param.copy_(value)
                param.requires_grad_(False)  # PEFT freezes the combined adapter
    model.lora_configs = {
        **getattr(model, "lora_configs", {}), adapter_name: LoRAConfig(rank, rank, dropout, list(holders))
    }
    return model


def merge_lora(model: nn.Module, adapter_names=None) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights, for inference at base-model cost."""
    layers = _require_lora_layers("merge_lora", model)
    if adapter_names is not None:
        adapter_names = _require_adapters("merge_lora", model, adapter_names)
    for layer in layers.values():
        layer.merge(adapter_names)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora."""
    for layer in _require_lora_layers("unmerge_lora", model).values():
        layer.unmerge()
    return model


def merge_and_unload_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights and put plain base layers back in their place; the
    inactive adapters are dropped (a PiSSA adapter's initial part goes back into its weight first)."""
    merge_lora(model)
    for name, layer in lora_layers(model).items():
        for adapter in [a for a in layer.lora_adapters if a not in layer.merged_adapters]:
            layer.delete_adapter(adapter)
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
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


def mark_only_lora_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze every parameter except the active adapters' (loralib / PEFT semantics).

    bias: "none" freezes all biases, "all" trains every parameter named `bias`, "lora_only"
    trains the biases of the LoRA layers only.
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"mark_only_lora_trainable: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    layers = _require_lora_layers("mark_only_lora_trainable", model)
    if not active_adapters(model):
        raise ValueError("mark_only_lora_trainable: no adapter is active; call set_adapter first")
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in layers.values():
        for adapter in layer.active_adapters:
            if adapter in layer.lora_adapters:
                for param in layer.adapter_parameters(adapter):
                    param.requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)
    elif bias == "lora_only":
        for layer in layers.values():
            if getattr(layer, "bias", None) is not None:
                layer.bias.requires_grad_(True)
    return model
