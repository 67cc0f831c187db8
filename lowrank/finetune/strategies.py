"""Fine-tuning strategies: each prepares a model (inject, freeze, unfreeze) and builds its param groups.

A Strategy is used by the Trainer in this order:

    model = strategy.prepare(model)            inject modules, set requires_grad, maybe new head
    groups = strategy.param_groups(model, lr)  every parameter that trains at any epoch, with its lr
    strategy.on_epoch_start(model, epoch)      per-epoch requires_grad (gradual unfreezing)
    strategy.set_train_mode(model)             train()/eval() per module before each training epoch
    model = strategy.finish(model)             after training (LoRA: merge and drop the adapters)

checkpoint_trained_only (a class attribute): the Trainer's checkpoints hold only the parameters the
optimizer updates (and the buffers), not the frozen base, which a resumed run rebuilds from the
same pre-trained model. True for every strategy but full fine-tuning.

Models are described by module names: `head` (default "head") is the output layer, kept
trainable by every strategy, and replaced by a fresh nn.Linear with `num_classes` outputs when
that is given; `blocks` (default "blocks") is a container of the transformer / conv blocks,
shallow to deep (full fine-tuning only). lowrank.finetune.models follows this layout; for a
Hugging Face model pass e.g. head="classifier", blocks="bert.encoder.layer".
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lowrank.tuners import (
    BottleneckConfig,
    inject_bottleneck,
    inject_lora,
    inject_prefix_attention,
    inject_soft_prompt,
    mark_only_bottleneck_trainable,
    mark_only_lora_trainable,
    mark_only_prompt_trainable,
    merge_and_unload_lora,
    prefix_tuning,
    prompt_tuning,
)

__all__ = [
    "Strategy",
    "FeatureExtraction",
    "FullFineTuning",
    "LoRA",
    "Adapters",
    "PromptTuning",
    "PrefixTuning",
    "STRATEGIES",
    "make_strategy",
]


def _submodule(owner: str, model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        top = [child for child, _ in model.named_children()]
        raise ValueError(
            f"{owner}: the model has no module {name!r} (the {what}); its top-level modules are {top}. "
            f"Pass {what}=<module name>"
        ) from None


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and isinstance(getattr(model, "base_model", None), nn.Module)


class Strategy:
    """Base class: trains every parameter (subclasses narrow that down). See the module docstring."""

    name = "strategy"
    checkpoint_trained_only = False

    def __init__(self, head: str | None = "head", num_classes: int | None = None):
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes <= 0):
            raise ValueError(f"{type(self).__name__}: num_classes must be a positive integer, got {num_classes!r}")
        if num_classes is not None and head is None:
            raise ValueError(f"{type(self).__name__}: num_classes needs head=<the output layer's name> to replace")
        self.head, self.num_classes = head, num_classes

    def config(self) -> dict:
        """The constructor arguments (recorded in checkpoints)."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def _head_module(self, model: nn.Module) -> nn.Module | None:
        return None if self.head is None else _submodule(type(self).__name__, model, self.head, "head")

    def _new_head(self, model: nn.Module) -> None:
        """Replace the head by a freshly initialised nn.Linear with num_classes outputs."""
        old = self._head_module(model)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{type(self).__name__}: num_classes replaces the head {self.head!r} by a new "
                             f"nn.Linear, but it is a {type(old).__name__}")
        parent, _, child = self.head.rpartition(".")
        new = nn.Linear(old.in_features, self.num_classes, bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)
        setattr(model.get_submodule(parent), child, new)

    def _start(self, model: nn.Module) -> None:
        if self.num_classes is not None:
            self._new_head(model)

    def _train_head(self, model: nn.Module) -> None:
        head = self._head_module(model)
        if head is not None:
            head.requires_grad_(True)

    def prepare(self, model: nn.Module) -> nn.Module:
        self._start(model)
        return model.requires_grad_(True)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__}: the prepared model has no trainable parameter")
        return [{"params": params, "lr": lr, "name": "trainable"}]

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        pass

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()

    def finish(self, model: nn.Module) -> nn.Module:
        return model


class FeatureExtraction(Strategy):
    """Freeze everything but the head. The frozen part runs in eval mode (dropout off, BatchNorm
    statistics fixed), so it is a fixed function of the input and its output can be cached:
    with cache_features=True the Trainer runs the backbone once over the data and then trains
    the head on the stored features (the head must be applied last, to one input)."""

    name = "feature_extraction"
    checkpoint_trained_only = True

    def __init__(self, head: str = "head", num_classes: int | None = None, cache_features: bool = False):
        if head is None:
            raise ValueError("FeatureExtraction: head must name the output layer that is trained")
        super().__init__(head, num_classes)
        self.cache_features = bool(cache_features)

    def prepare(self, model: nn.Module) -> nn.Module:
        self._start(model)
        model.requires_grad_(False)
        self._train_head(model)
        return model

    def set_train_mode(self, model: nn.Module) -> None:
        model.eval()
        self._head_module(model).train()

    @torch.no_grad()
    def features(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """What the head receives for `inputs` (the backbone in eval mode)."""
        captured = []
        hook = self._head_module(model).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        was_training = model.training
        try:
            model.eval()
            model(inputs)
        finally:
            hook.remove()
            model.train(was_training)
        if len(captured) != 1:
            raise ValueError(f"FeatureExtraction: cache_features needs the head {self.head!r} to be called once per "
                             f"forward pass, it was called {len(captured)} times")
        return captured[0]


def _block_list(owner: str, model: nn.Module, blocks: str) -> list[nn.Module]:
    container = _submodule(owner, model, blocks, "blocks")
    children = list(container.children())
    if not children:
        raise ValueError(f"{owner}: blocks={blocks!r} names a module with no child blocks")
    return children


class FullFineTuning(Strategy):
    """Train the whole model, or only the last `last_k` blocks and what follows them.

    Discriminative learning rates (ULMFiT): the head and every parameter registered after the
    blocks (a final norm) get lr, the deepest block lr·lr_decay, the next lr·lr_decay², ..., and
    the parameters registered before the blocks (the stem / embeddings) lr·lr_decay^(n+1).
    Gradual unfreezing: with unfreeze_every=E, epochs 0..E-1 train only the head (and what
    follows the blocks), then every E epochs one more block from the top joins, then the stem.
    """

    name = "full_finetuning"

    def __init__(self, head: str | None = "head", num_classes: int | None = None, blocks: str | None = "blocks",
                 last_k: int | None = None, lr_decay: float = 1.0, unfreeze_every: int | None = None):
        super().__init__(head, num_classes)
        if last_k is not None and (isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 0):
            raise ValueError(f"FullFineTuning: last_k must be a non-negative integer, got {last_k!r}")
        if not isinstance(lr_decay, (int, float)) or not 0.0 < lr_decay <= 1.0:
            raise ValueError(f"FullFineTuning: lr_decay must lie in (0, 1], got {lr_decay!r}")
        if unfreeze_every is not None and (not isinstance(unfreeze_every, int) or unfreeze_every <= 0):
            raise ValueError(f"FullFineTuning: unfreeze_every must be a positive integer, got {unfreeze_every!r}")
        if blocks is None and (last_k is not None or lr_decay != 1.0 or unfreeze_every is not None):
            raise ValueError("FullFineTuning: last_k, lr_decay and unfreeze_every need blocks=<the blocks' container>")
        self.blocks, self.last_k, self.lr_decay, self.unfreeze_every = blocks, last_k, float(lr_decay), unfreeze_every

    def _units(self, model: nn.Module) -> list[list[nn.Parameter]]:
        """Parameters by depth from the top: [after the blocks + head, deepest block, ..., first block, stem]."""
        block_list = _block_list("FullFineTuning", model, self.blocks)
        in_blocks = {id(p) for p in _submodule("FullFineTuning", model, self.blocks, "blocks").parameters()}
        stem, top, seen_blocks = [], [], False
        for p in model.parameters():
            if id(p) in in_blocks:
                seen_blocks = True
            else:
                (top if seen_blocks else stem).append(p)
        return [top, *([list(b.parameters()) for b in reversed(block_list)]), stem]

    def _trainable_units(self, model: nn.Module) -> list[list[nn.Parameter]]:
        units = self._units(model)
        if self.last_k is None:
            return units
        if self.last_k > len(units) - 2:
            raise ValueError(f"FullFineTuning: last_k={self.last_k} but the model has {len(units) - 2} blocks")
        return units[: 1 + self.last_k]

    def prepare(self, model: nn.Module) -> nn.Module:
        self._start(model)
        model.requires_grad_(self.blocks is None)
        if self.blocks is not None:
            self.on_epoch_start(model, 0)
        return model

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if self.blocks is None:
            return
        units = self._trainable_units(model)
        unfrozen = len(units) if self.unfreeze_every is None else 1 + epoch // self.unfreeze_every
        model.requires_grad_(False)
        for unit in units[:unfrozen]:
            for p in unit:
                p.requires_grad_(True)
        self._train_head(model)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        if self.blocks is None:
            return super().param_groups(model, lr)
        return [{"params": unit, "lr": lr * self.lr_decay**depth, "name": f"depth{depth}"}
                for depth, unit in enumerate(self._trainable_units(model)) if unit]


def _default_linear_targets(model: nn.Module, head: str | None) -> str:
    """A regex matching exactly every Linear / Conv1D layer outside the head."""
    from lowrank.nn.lora import is_hf_conv1d

    names = [name for name, module in model.named_modules()
             if name and (isinstance(module, nn.Linear) or is_hf_conv1d(module))
             and not (head and (name == head or name.startswith(head + ".")))]
    if not names:
        raise ValueError("LoRA: the model has no nn.Linear outside the head; pass target_modules")
    return "|".join(re.escape(name) for name in names)


class LoRA(Strategy):
    """LoRA on `target_modules` (inject_lora's rules; default every nn.Linear outside the head);
    only LoRA's A and B and the head train. finish() merges and removes the adapters, so a next
    stage starts from plain layers holding the merged weights."""

    name = "lora"
    checkpoint_trained_only = True

    def __init__(self, head: str | None = "head", num_classes: int | None = None, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, target_modules=None, backend: str | None = None):
        super().__init__(head, num_classes)
        self.r, self.alpha, self.dropout, self.target_modules, self.backend = r, alpha, dropout, target_modules, backend

    def prepare(self, model: nn.Module) -> nn.Module:
        self._start(model)
        targets = self.target_modules or _default_linear_targets(model, self.head)
        inject_lora(model, targets, self.r, self.alpha, self.dropout, backend=self.backend)
        mark_only_lora_trainable(model)
        self._train_head(model)
        return model

    def finish(self, model: nn.Module) -> nn.Module:
        return merge_and_unload_lora(model)


class Adapters(Strategy):
    """Bottleneck adapters (inject_bottleneck; see BottleneckConfig); only they and the head train."""

    name = "adapters"
    checkpoint_trained_only = True

    def __init__(self, head: str | None = "head", num_classes: int | None = None, placement: str | None = None,
                 bottleneck: int = 64, activation: str = "relu", scaling: float = 1.0, init: str = "identity",
                 target_modules=None, dim: int | None = None, backend: str | None = None):
        super().__init__(head, num_classes)
        self.adapter_config = BottleneckConfig(placement=placement, bottleneck=bottleneck, activation=activation,
                                            scaling=scaling, init=init, target_modules=target_modules, dim=dim,
                                            backend=backend)

    def config(self) -> dict:
        from dataclasses import asdict

        return {"name": self.name, "head": self.head, "num_classes": self.num_classes, **asdict(self.adapter_config)}

    def prepare(self, model: nn.Module) -> nn.Module:
        self._start(model)
        inject_bottleneck(model, self.adapter_config)
        mark_only_bottleneck_trainable(model)
        self._train_head(model)
        return model


class PromptTuning(Strategy):
    """A trainable SoftPrompt of num_virtual_tokens in front of the token embeddings; the model is frozen.

    embeddings=<module name>: the SoftPrompt becomes that module's child `soft_prompt` and is
    prepended to its output [B, T, D] (dim: D; read from the module's last parameter when not
    given). Without it the model must be a Hugging Face model, wrapped by lowrank.prompt_tuning.
    """

    name = "prompt_tuning"
    checkpoint_trained_only = True

    def __init__(self, head: str | None = "head", num_classes: int | None = None, num_virtual_tokens: int = 10,
                 embeddings: str | None = None, dim: int | None = None, init: str = "random"):
        super().__init__(head, num_classes)
        self.num_virtual_tokens, self.embeddings, self.dim, self.init = num_virtual_tokens, embeddings, dim, init

    def prepare(self, model: nn.Module) -> nn.Module:
        self._start(model)
        head = self._head_module(model)
        if self.embeddings is None:
            if not _is_hf_model(model):
                raise ValueError("PromptTuning: pass embeddings=<the module whose output [B, T, D] takes the prompt> "
                                 f"for a {type(model).__name__} (only Hugging Face models are wrapped automatically)")
            model = prompt_tuning(model, self.num_virtual_tokens, init=self.init)
        else:
            _submodule("PromptTuning", model, self.embeddings, "embeddings")
            inject_soft_prompt(model, self.embeddings, self.num_virtual_tokens, self.dim, self.init)
        mark_only_prompt_trainable(model)
        if head is not None:
            head.requires_grad_(True)
        return model


class PrefixTuning(Strategy):
    """Trainable key/value prefixes in every attention layer; the model is frozen.

    A Hugging Face model is wrapped by lowrank.prefix_tuning. In other models every self-attention
    module with q_proj/k_proj/v_proj/out_proj Linear layers and `num_heads` (or those named by
    target_modules, a regular expression) becomes a lowrank.nn.PrefixAttention sharing its
    projections; its forward must take (x) or (x, attention_mask, is_causal) as PrefixAttention's.
    """

    name = "prefix_tuning"
    checkpoint_trained_only = True

    def __init__(self, head: str | None = "head", num_classes: int | None = None, num_virtual_tokens: int = 10,
                 projection_dim: int | None = None, target_modules: str | None = None):
        super().__init__(head, num_classes)
        self.num_virtual_tokens, self.projection_dim, self.target_modules = (
            num_virtual_tokens, projection_dim, target_modules)

    def prepare(self, model: nn.Module) -> nn.Module:
        self._start(model)
        head = self._head_module(model)
        if _is_hf_model(model) and self.target_modules is None:
            model = prefix_tuning(model, self.num_virtual_tokens, self.projection_dim)
        else:
            inject_prefix_attention(model, self.num_virtual_tokens, self.projection_dim, self.target_modules)
        mark_only_prompt_trainable(model)
        if head is not None:
            head.requires_grad_(True)
        return model


STRATEGIES = {cls.name: cls for cls in (FeatureExtraction, FullFineTuning, LoRA, Adapters, PromptTuning, PrefixTuning)}


def make_strategy(spec: dict) -> Strategy:
    """A strategy from {"name": <one of STRATEGIES>, **its constructor arguments}, with clear errors."""
    import inspect

    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"strategy: expected a mapping with a 'name' (one of {sorted(STRATEGIES)}), got {spec!r}")
    cls = STRATEGIES.get(spec["name"])
    if cls is None:
        raise ValueError(f"strategy: unknown strategy {spec['name']!r}; expected one of {sorted(STRATEGIES)}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"strategy {spec['name']!r}: unknown option(s) {unknown}; expected some of {allowed}")
    return cls(**kwargs)
