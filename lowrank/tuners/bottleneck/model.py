"""Model surgery for bottleneck adapters: insert `lowrank.nn.Adapter`s into an existing model, in place.

Each adapter becomes a child named `adapter` of the module it sits at (its "site"), so its weights
appear in the model's state_dict as `<site>.adapter.down.weight` etc., and the base model's own keys
do not change. It joins the computation through a forward hook (or pre-hook) on the site; no base
module is replaced. Placements (BottleneckConfig.placement), with A(h) = h + scaling·f(h) the residual
adapter and f(h) = act(h·W_downᵀ + b_down)·W_upᵀ + b_up:

    "houlsby"   after the attention sublayer and after the feed-forward sublayer
    "pfeiffer"  after the feed-forward sublayer only
    "parallel"  beside the feed-forward sublayer: it reads the FFN's input x and adds
                scaling·f(x) to the FFN's output (He et al. 2022)

per detected block style:

    BERT-style (a layer with .attention.output and .output that are BertSelfOutput / BertOutput-like:
    dense, dropout, LayerNorm, forward(hidden_states, input_tensor); RoBERTa, ELECTRA, ... alike)
        sequential: LayerNorm(A(dropout(dense(x))) + input_tensor), AdapterHub's position; the
                    adapter's site is the attention.output / output module, the hook sits on its
                    dropout.
        parallel:   LayerNorm(dropout(dense(x)) + input_tensor + scaling·f(input_tensor)), where
                    input_tensor (the attention output) is the FFN's input. This is computed as
                    LayerNorm(dropout(dense(x)) + A(input_tensor)): a pre-hook on `output` passes
                    A(input_tensor) in place of input_tensor, so the op fuses the add.
    GPT-2-style (a block with attn, mlp, ln_1, ln_2; cross-attention is left alone)
    Llama-style (a layer with self_attn, mlp, input_layernorm, post_attention_layernorm)
        sequential: residual + A(attn(ln(x))) and residual + A(mlp(ln(x))): the hook wraps the
                    sublayer's output (the first element when it returns a tuple).
        parallel:   residual + mlp(y) + scaling·f(y), y = the normalised input the mlp receives.

`target_modules` instead puts an adapter on any module named by the user, matched with LoRA's rules
(a list of full names or "."-suffixes, or a regular expression that must match the whole name):
placement "sequential" (the default there) wraps its output as A(output); "parallel" adds
scaling·f(input) to its output (input and output must both have `dim` features).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from lowrank.nn.adapter import Adapter

__all__ = ["BottleneckConfig", "inject_bottleneck", "bottleneck_adapters", "mark_only_bottleneck_trainable"]

CHILD = "adapter"  # the attribute each adapter is registered under at its site
_BLOCK_PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
_TARGET_PLACEMENTS = ("sequential", "parallel")
SHOWN = 10


@dataclass
class BottleneckConfig:
    """What inject_bottleneck inserts, and where (see the module docstring).

    placement: "houlsby" | "pfeiffer" | "parallel" for detected blocks (default "houlsby");
    "sequential" | "parallel" with target_modules (default "sequential").
    dim: the adapters' feature size; read from the model when left None.
    """

    placement: str | None = None
    bottleneck: int = 64
    activation: str = "relu"
    scaling: float = 1.0
    init: str = "identity"
    init_std: float = 1e-2
    target_modules: list[str] | str | None = None
    dim: int | None = None
    backend: str | None = None


# ----------------------------------------------------------------------------------------- hooks
# Hooks are small callable objects holding their adapter (not closures), so deepcopy maps them onto
# the copied adapter and the model still pickles.


def _first_tensor(adapter: Adapter, value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"{adapter._label()}: the site's {what} is a {type(value).__name__}; expected a tensor "
                    "or a tuple starting with one")  # fmt: skip


def _with_first(value, first: torch.Tensor):
    return first if isinstance(value, torch.Tensor) else type(value)((first, *value[1:]))


class _Sequential:
    """Forward hook: the module's output h becomes A(h)."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def __call__(self, module, args, output):
        return _with_first(output, self.adapter(_first_tensor(self.adapter, output, "output")))


class _Parallel:
    """Forward hook (with kwargs): output + scaling·f(input), the input being the first positional
    argument, else the first tensor keyword argument."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def __call__(self, module, args, kwargs, output):
        inputs = args if args else tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        x = _first_tensor(self.adapter, inputs, "input")
        return _with_first(output, _first_tensor(self.adapter, output, "output") + self.adapter(x))


class _PostLNParallel:
    """Forward pre-hook (with kwargs) on a BertOutput-like module: input_tensor becomes A(input_tensor)."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def __call__(self, module, args, kwargs):
        if len(args) >= 2:
            return (args[0], self.adapter(args[1]), *args[2:]), kwargs
        if "input_tensor" in kwargs:
            return args, {**kwargs, "input_tensor": self.adapter(kwargs["input_tensor"])}
        raise TypeError(f"{self.adapter._label()}: expected {type(module).__name__}(hidden_states, input_tensor)")


@dataclass(frozen=True)
class _Kind:
    residual: bool
    attach: Callable[[nn.Module, Adapter], None]


# How each kind of site takes its adapter. Saved files name the kind, so these names are a file format.
KINDS = {
    "sequential": _Kind(True, lambda site, a: site.register_forward_hook(_Sequential(a))),
    "parallel": _Kind(False, lambda site, a: site.register_forward_hook(_Parallel(a), with_kwargs=True)),
    "post_ln_sequential": _Kind(True, lambda site, a: site.dropout.register_forward_hook(_Sequential(a))),
    "post_ln_parallel": _Kind(
        True, lambda site, a: site.register_forward_pre_hook(_PostLNParallel(a), with_kwargs=True)
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------ block detection


def _is_post_ln_output(module) -> bool:
    """BertSelfOutput / BertOutput-like: LayerNorm(dropout(dense(x)) + input_tensor)."""
    return (
        isinstance(module, nn.Module)
        and isinstance(getattr(module, "dense", None), nn.Linear)
        and isinstance(getattr(module, "dropout", None), nn.Dropout)
        and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
    )


def _has(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


def _norm_size(norm: nn.Module) -> int:
    shape = getattr(norm, "normalized_shape", None) or norm.weight.shape
    return int(shape[-1])


@dataclass(frozen=True)
class _BlockStyle:
    name: str
    matches: Callable[[nn.Module], bool]
    dim: Callable[[nn.Module], int]
    # placement -> [(site path inside the block, kind)]
    sites: dict[str, list[tuple[str, str]]]


def _pre_ln_sites(attention: str) -> dict[str, list[tuple[str, str]]]:
    """A pre-LN block's sites: the adapter wraps a sublayer's output, or sits beside the `mlp`."""
    return {
        "houlsby": [(attention, "sequential"), ("mlp", "sequential")],
        "pfeiffer": [("mlp", "sequential")],
        "parallel": [("mlp", "parallel")],
    }


_STYLES = (
    _BlockStyle(
        "BERT",
        lambda m: _has(m, "attention", "intermediate")
        and _is_post_ln_output(getattr(m, "output", None))
        and _is_post_ln_output(getattr(m.attention, "output", None)),
        lambda m: _norm_size(m.output.LayerNorm),
        {
            "houlsby": [("attention.output", "post_ln_sequential"), ("output", "post_ln_sequential")],
            "pfeiffer": [("output", "post_ln_sequential")],
            "parallel": [("output", "post_ln_parallel")],
        },
    ),
    _BlockStyle(
        "GPT-2", lambda m: _has(m, "attn", "mlp", "ln_1", "ln_2"), lambda m: _norm_size(m.ln_2), _pre_ln_sites("attn")
    ),
    _BlockStyle(
        "Llama",
        lambda m: _has(m, "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"),
        lambda m: _norm_size(m.post_attention_layernorm),
        _pre_ln_sites("self_attn"),
    ),
)


def join_name(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _block_sites(model: nn.Module, placement: str, dim: int | None) -> list[tuple[str, str, int]]:
    sites = []
    for name, module in model.named_modules():
        style = next((s for s in _STYLES if s.matches(module)), None)
        if style is not None:
            block_dim = dim if dim is not None else style.dim(module)
            sites += [(join_name(name, path), kind, block_dim) for path, kind in style.sites[placement]]
    if not sites:
        classes = sorted({type(m).__name__ for m in model.modules()})
        shown = ", ".join(classes[:30]) + (", ..." if len(classes) > 30 else "")
        raise ValueError(
            "inject_bottleneck: unsupported model: found no BERT-style (attention/intermediate/output), GPT-2-style "
            "(attn/mlp/ln_1/ln_2) or Llama-style (self_attn/mlp/input_layernorm/post_attention_layernorm) block "
            f"among its module classes [{shown}]; name the modules to adapt with target_modules"
        )
    return sites


def _inside_adapter(name: str) -> bool:
    return f".{CHILD}." in f".{name}."


def _output_size(model: nn.Module, name: str, module: nn.Module, dim: int | None) -> int:
    if dim is not None:
        return dim
    for attribute in ("out_features", "nf", "embedding_dim"):
        if isinstance(getattr(module, attribute, None), int):
            return getattr(module, attribute)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return _norm_size(module)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden_size, int):
        return hidden_size  # a Hugging Face model: sublayers of a block map to its hidden size
    raise ValueError(
        f"inject_bottleneck: cannot tell the output size of module {name!r} ({type(module).__name__}); "
        "pass dim in the config"
    )


def site_width(model: nn.Module, site_name: str, kind: str | None) -> int | None:
    """The feature size an adapter of `kind` at `site_name` reads and writes: its block's hidden size
    for a site of a detected block, else the site's output size; None where the model does not show it."""
    parts = site_name.split(".")
    for depth in range(len(parts) - 1, -1, -1):  # the innermost enclosing block
        block = model.get_submodule(".".join(parts[:depth]))
        style = next((s for s in _STYLES if s.matches(block)), None)
        inside = ".".join(parts[depth:])
        if style is not None and any((inside, kind) in sites for sites in style.sites.values()):
            return style.dim(block)
    try:
        return _output_size(model, site_name, model.get_submodule(site_name), None)
    except ValueError:
        return None


def _names(targets) -> bool:
    return bool(targets) and all(isinstance(t, str) and t for t in targets)


def _target_sites(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, str, int]]:
    targets = config.target_modules
    named = [(n, m) for n, m in model.named_modules() if n and not _inside_adapter(n) and not isinstance(m, Adapter)]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"inject_bottleneck: target_modules={targets!r} is not a valid regular expression: {err}")
        matched = [(n, m) for n, m in named if pattern.fullmatch(n)]
    elif isinstance(targets, (list, tuple, set, frozenset)) and _names(targets):
        matched = [(n, m) for n, m in named if any(n == t or n.endswith("." + t) for t in targets)]
    else:
        raise TypeError(
            "inject_bottleneck: target_modules must be a non-empty list of module names (full names or '.'-suffixes) "
            f"or a regular expression string; got {targets!r}"
        )
    if not matched:
        shown = ", ".join(n for n, _ in named[:SHOWN]) + (", ..." if len(named) > SHOWN else "")
        raise ValueError(f"inject_bottleneck: target_modules={targets!r} matched no module; the model has {shown}")
    return [(n, config.placement, _output_size(model, n, m, config.dim)) for n, m in matched]


# ------------------------------------------------------------------------------------ injection


def _as_config(config) -> BottleneckConfig:
    if isinstance(config, dict):
        unknown = sorted(set(config) - set(BottleneckConfig.__dataclass_fields__))
        if unknown:
            raise TypeError(f"inject_bottleneck: unknown config keys {unknown}")
        config = BottleneckConfig(**config)
    if not isinstance(config, BottleneckConfig):
        raise TypeError(f"inject_bottleneck: config must be an BottleneckConfig or a dict, got {type(config).__name__}")
    placements = _TARGET_PLACEMENTS if config.target_modules is not None else _BLOCK_PLACEMENTS
    placement = config.placement if config.placement is not None else placements[0]
    if placement not in placements:
        where = "with target_modules" if config.target_modules is not None else "without target_modules"
        raise ValueError(f"inject_bottleneck: placement must be one of {placements} {where}, got {placement!r}")
    return BottleneckConfig(**{**asdict(config), "placement": placement})


def _factory(model: nn.Module, site: nn.Module) -> dict:
    reference = next(site.parameters(), None)
    if reference is None:
        reference = next(model.parameters(), None)
    return {} if reference is None else {"device": reference.device, "dtype": reference.dtype}


def bottleneck_adapters(model: nn.Module) -> dict[str, Adapter]:
    """Every Adapter in `model`, by full module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, Adapter)}


def adapter_sites(model: nn.Module) -> dict[str, str]:
    """Adapter full name -> kind, for the adapters inject_bottleneck / load_bottleneck attached by hooks."""
    return getattr(model, "adapter_sites", {})


def build_adapter(caller, model, site_name, kind, dim, bottleneck, activation, scaling, init="identity", init_std=1e-2,
           backend=None):  # fmt: skip
    site = model.get_submodule(site_name)
    if isinstance(site, Adapter) or _inside_adapter(site_name):
        raise ValueError(f"{caller}: {site_name!r} is part of an adapter")
    if isinstance(site, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise ValueError(
            f"{caller}: module {site_name!r} is a {type(site).__name__}, whose children are its layers, so "
            "an adapter cannot be registered inside it; target its last layer or wrap it in a module of your own"
        )
    if hasattr(site, CHILD):
        raise ValueError(f"{caller}: module {site_name!r} already has an attribute {CHILD!r} (an adapter?)")
    return Adapter(
        dim, bottleneck, activation, scaling, init, residual=KINDS[kind].residual, init_std=init_std,
        backend=backend, name=join_name(site_name, CHILD), **_factory(model, site),
    )  # fmt: skip


def install_adapters(model: nn.Module, built: dict[str, tuple[str, Adapter]]) -> None:
    """Register each adapter at its site and hook it in; `built` maps site name -> (kind, adapter)."""
    sites = dict(adapter_sites(model))
    for site_name, (kind, adapter) in built.items():
        site = model.get_submodule(site_name)
        site.add_module(CHILD, adapter)
        KINDS[kind].attach(site, adapter)
        sites[join_name(site_name, CHILD)] = kind
    model.adapter_sites = sites


def inject_bottleneck(model: nn.Module, config: BottleneckConfig | dict) -> nn.Module:
    """Insert bottleneck adapters into `model` in place (see the module docstring) and return it.

    Raises ValueError when no supported block is found, when target_modules matches nothing, or when
    a site already has an adapter; nothing is changed then.
    """
    config = _as_config(config)
    if config.target_modules is not None:
        sites = _target_sites(model, config)
    else:
        sites = _block_sites(model, config.placement, config.dim)
    # Build every adapter before installing any, so a failure leaves the model as it was.
    hyperparameters = (
        config.bottleneck,
        config.activation,
        config.scaling,
        config.init,
        config.init_std,
        config.backend,
    )
    built = {
        name: (kind, build_adapter("inject_bottleneck", model, name, kind, dim, *hyperparameters))
        for name, kind, dim in sites
    }
    install_adapters(model, built)
    return model


def mark_only_bottleneck_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the adapters'."""
    adapters = bottleneck_adapters(model)
    if not adapters:
        raise ValueError("mark_only_bottleneck_trainable: the model has no adapters; call inject_bottleneck first")
    for param in model.parameters():
        param.requires_grad_(False)
    for adapter in adapters.values():
        for param in adapter.parameters():
            param.requires_grad_(True)
    return model
