"""Prompt tuning and prefix tuning for Hugging Face transformers models (frozen; only the prompt trains).

PromptTuningModel(model, SoftPrompt) looks the input ids up in the model's own input
embeddings, puts the soft prompt in front and calls the model on `inputs_embeds`. Over the
n + T positions that result:
    attention_mask   ones for the n virtual tokens (a mask of ones is made when none is given);
    position_ids     virtual tokens take positions 0..n-1 and real tokens shift by n, which is
                     also what a model does by default with no position_ids;
    token_type_ids   zeros for the virtual tokens;
    labels           -100 (ignored) for the virtual tokens when labels are per token ([B, T],
                     causal LM, token classification); per-sequence labels pass unchanged.
Outputs cover all n + T positions, virtual tokens first (as in PEFT).

PrefixTuningModel(model, PrefixEncoder) hands every attention layer n learned key/value pairs
through the model's key/value cache (a transformers DynamicCache), as PEFT does, so outputs
match PEFT's for the same prefix. The cache goes to the backbone (`model.base_model`) by a
forward pre-hook, so models whose task head does not take a cache (BertForSequenceClassification)
work too. Like PEFT, the real tokens then sit at positions n..n+T-1 (the model sees the prefix
as n earlier tokens; position_ids given by the caller are shifted by n); the attention mask
gets ones for the prefix and outputs cover the T real positions only.
Tested families: BERT (encoder), GPT-2 and Llama (decoders). Models that take no cache
(DistilBERT, ...) and encoder-decoder models raise; lowrank.nn.PrefixAttention is the fallback
for models built by hand.

Neither wrapper supports generation with a cache (`generate`, incremental decoding).
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from lowrank.nn.prompt import PrefixAttention, PrefixEncoder, SoftPrompt

__all__ = [
    "PromptTuningModel", "PrefixTuningModel", "prompt_tuning", "prefix_tuning", "inject_soft_prompt",
    "inject_prefix_attention", "prompt_modules", "mark_only_prompt_trainable",
]

IGNORE_INDEX = -100  # what Hugging Face losses skip
_CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5 renames past_key_values to cache


def _sequence_shape(owner: str, input_ids, inputs_embeds) -> tuple[int, int]:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(
            f"{owner}: pass exactly one of input_ids [batch, seq_len] or inputs_embeds [batch, seq_len, dim]"
        )
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"{owner}: input_ids must be [batch, seq_len], got {tuple(input_ids.shape)}")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise ValueError(f"{owner}: inputs_embeds must be [batch, seq_len, dim], got {tuple(inputs_embeds.shape)}")
    source = input_ids if input_ids is not None else inputs_embeds
    return source.shape[0], source.shape[1]


def _check_token_tensor(owner: str, name: str, tensor: torch.Tensor, batch: int, seq_len: int, rows=None) -> None:
    rows = rows or (batch,)
    if tensor.dim() != 2 or tensor.shape[0] not in rows or tensor.shape[1] != seq_len:
        raise ValueError(f"{owner}: {name} must be [batch, seq_len] = {(batch, seq_len)}, got {tuple(tensor.shape)}")


def _extended_mask(owner: str, attention_mask, batch: int, seq_len: int, n: int, device) -> torch.Tensor:
    """The [B, T] mask (ones when None) with ones for the n virtual positions in front."""
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    _check_token_tensor(owner, "attention_mask", attention_mask, batch, seq_len)
    return torch.cat((attention_mask.new_ones(batch, n), attention_mask), dim=1)


def _check_positions(owner: str, model: nn.Module, n: int, seq_len: int) -> None:
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and n + seq_len > max_positions:
        raise ValueError(
            f"{owner}: {n} virtual tokens + {seq_len} input tokens = {n + seq_len} positions, but the model "
            f"has max_position_embeddings={max_positions}; shorten the input to at most {max_positions - n} tokens"
        )


def _reject_cache(owner: str, kwargs: dict) -> None:
    for name in _CACHE_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{owner}: a {name} (incremental decoding / generate) is not supported")


class PromptTuningModel(nn.Module):
    """A frozen Hugging Face model with a trainable SoftPrompt in front of its input embeddings."""

    def __init__(self, model: nn.Module, soft_prompt: SoftPrompt):
        super().__init__()
        if not isinstance(soft_prompt, SoftPrompt):
            raise TypeError(f"PromptTuningModel: expected a lowrank.nn.SoftPrompt, got {type(soft_prompt).__name__}")
        get_input_embeddings = getattr(model, "get_input_embeddings", None)
        embeddings = get_input_embeddings() if callable(get_input_embeddings) else None
        if not isinstance(embeddings, nn.Embedding):
            raise ValueError(
                f"PromptTuningModel: {type(model).__name__} has no get_input_embeddings() returning an nn.Embedding; "
                "for other models apply SoftPrompt to the token embeddings directly"
            )
        if embeddings.embedding_dim != soft_prompt.dim:
            raise ValueError(
                f"PromptTuningModel: the soft prompt has dim {soft_prompt.dim}, but {type(model).__name__}'s input "
                f"embeddings have dim {embeddings.embedding_dim}"
            )
        self.model = model.requires_grad_(False)
        self.prompt = soft_prompt

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        **kwargs,
    ):
        owner = "PromptTuningModel"
        _reject_cache(owner, kwargs)
        batch, seq_len = _sequence_shape(owner, input_ids, inputs_embeds)
        n = self.prompt.num_virtual_tokens
        _check_positions(owner, self.model, n, seq_len)
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        device = inputs_embeds.device
        if token_type_ids is not None:
            _check_token_tensor(owner, "token_type_ids", token_type_ids, batch, seq_len)
            kwargs["token_type_ids"] = torch.cat((token_type_ids.new_zeros(batch, n), token_type_ids), dim=1)
        if position_ids is not None:
            _check_token_tensor(owner, "position_ids", position_ids, batch, seq_len, rows=(1, batch))
            virtual = torch.arange(n, device=device, dtype=position_ids.dtype).expand(position_ids.shape[0], n)
            kwargs["position_ids"] = torch.cat((virtual, position_ids + n), dim=1)
        if labels is not None and labels.dim() == 2 and labels.shape == (batch, seq_len):
            labels = torch.cat((labels.new_full((batch, n), IGNORE_INDEX), labels), dim=1)
        if labels is not None:
            kwargs["labels"] = labels
        return self.model(
            inputs_embeds=self.prompt(inputs_embeds),
            attention_mask=_extended_mask(owner, attention_mask, batch, seq_len, n, device),
            **kwargs,
        )


def prompt_tuning(
    model: nn.Module,
    num_virtual_tokens: int,
    init: str = "random",
    init_text: str | None = None,
    tokenizer=None,
    generator: torch.Generator | None = None,
) -> PromptTuningModel:
    """Wrap a Hugging Face model with a new SoftPrompt sized to its input embeddings (see SoftPrompt for init)."""
    embeddings = model.get_input_embeddings()
    soft_prompt = SoftPrompt(
        num_virtual_tokens, embeddings.embedding_dim, init, embeddings, init_text, tokenizer, generator,
        device=embeddings.weight.device,
    )  # fmt: skip
    return PromptTuningModel(model, soft_prompt)


def _prefix_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) of a transformers config; grouped-query models have fewer kv heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def _cache_kwarg(owner: str, model: nn.Module) -> str:
    """The name of the cache argument of the model's backbone (`model.base_model`)."""
    config = getattr(model, "config", None)
    backbone = getattr(model, "base_model", None)
    if config is None or not isinstance(backbone, nn.Module):
        raise ValueError(f"{owner}: expected a Hugging Face transformers model, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{owner}: encoder-decoder models ({config.model_type}) are not supported")
    parameters = inspect.signature(backbone.forward).parameters
    for name in _CACHE_KWARGS:
        if name in parameters:
            return name
    raise ValueError(
        f"{owner}: {type(backbone).__name__} ({config.model_type}) takes no key/value cache, so prefixes cannot be "
        "passed to its attention layers; supported are models whose backbone accepts `cache` / `past_key_values` "
        "(tested: BERT, GPT-2, Llama). For a model of your own, use lowrank.nn.PrefixAttention"
    )


class PrefixTuningModel(nn.Module):
    """A frozen Hugging Face model whose attention layers all see trainable key/value prefixes."""

    def __init__(self, model: nn.Module, prefix_encoder: PrefixEncoder):
        super().__init__()
        owner = "PrefixTuningModel"
        if not isinstance(prefix_encoder, PrefixEncoder):
            raise TypeError(f"{owner}: expected a lowrank.nn.PrefixEncoder, got {type(prefix_encoder).__name__}")
        self.cache_kwarg = _cache_kwarg(owner, model)
        expected = _prefix_shape(model.config)
        got = (prefix_encoder.num_layers, prefix_encoder.num_heads, prefix_encoder.head_dim)
        if got != expected:
            raise ValueError(
                f"{owner}: the prefix encoder is (num_layers, num_heads, head_dim) = {got}, but "
                f"{type(model).__name__} needs {expected}"
            )
        self.model = model.requires_grad_(False)
        self.prefix = prefix_encoder

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None, **kwargs):
        from transformers import DynamicCache

        owner = "PrefixTuningModel"
        _reject_cache(owner, kwargs)
        batch, seq_len = _sequence_shape(owner, input_ids, inputs_embeds)
        n = self.prefix.num_virtual_tokens
        _check_positions(owner, self.model, n, seq_len)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if position_ids is not None:
            _check_token_tensor(owner, "position_ids", position_ids, batch, seq_len, rows=(1, batch))
            kwargs["position_ids"] = position_ids + n
        dtype = self.model.dtype
        cache = DynamicCache([(key.to(dtype), value.to(dtype)) for key, value in self.prefix(batch)])

        def pass_prefix_cache(module, args, backbone_kwargs):
            return args, {**backbone_kwargs, self.cache_kwarg: cache}

        hook = self.model.base_model.register_forward_pre_hook(pass_prefix_cache, with_kwargs=True)
        try:
            return self.model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=_extended_mask(owner, attention_mask, batch, seq_len, n, device),
                **kwargs,
            )
        finally:
            hook.remove()


def prefix_tuning(model: nn.Module, num_virtual_tokens: int, projection_dim: int | None = None) -> PrefixTuningModel:
    """Wrap a Hugging Face model with a new PrefixEncoder sized to its attention layers."""
    _cache_kwarg("prefix_tuning", model)  # fail on an unsupported family before reading its config
    layers, heads, head_dim = _prefix_shape(model.config)
    device = next(model.parameters()).device
    return PrefixTuningModel(model, PrefixEncoder(num_virtual_tokens, layers, heads, head_dim, projection_dim, device))


# ------------------------------------------------------------------ models built by hand (not Hugging Face)


class _PrependPrompt:
    """Forward hook: the module's output [B, T, D] becomes [prompt; output]."""

    def __init__(self, prompt: SoftPrompt):
        self.prompt = prompt

    def __call__(self, module, args, output):
        return self.prompt(output)


def inject_soft_prompt(model: nn.Module, embeddings: str, num_virtual_tokens: int, dim: int | None = None,
                       init: str = "random") -> nn.Module:
    """Prepend a trainable SoftPrompt to the output [B, T, D] of the module named `embeddings`, in place.

    The prompt becomes that module's child `soft_prompt`; dim is D, read from the module's last
    parameter when not given.
    """
    site = model.get_submodule(embeddings)
    parameters = list(site.parameters())
    if dim is None and not parameters:
        raise ValueError(f"inject_soft_prompt: module {embeddings!r} has no parameters to read dim from; pass dim")
    dim = dim or parameters[-1].shape[-1]
    device = parameters[-1].device if parameters else None
    site.soft_prompt = SoftPrompt(num_virtual_tokens, dim, init=init, device=device)
    site.register_forward_hook(_PrependPrompt(site.soft_prompt))
    return model


def _is_attention(module: nn.Module) -> bool:
    return isinstance(getattr(module, "num_heads", None), int) and all(
        isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))


def inject_prefix_attention(model: nn.Module, num_virtual_tokens: int, projection_dim: int | None = None,
                            target_modules: str | None = None) -> nn.Module:
    """Replace self-attention modules by lowrank.nn.PrefixAttention sharing their projections, in place.

    The modules are those with q_proj/k_proj/v_proj/out_proj Linear layers and `num_heads`, or those
    whose full name matches the regular expression `target_modules`; their forward must take (x) or
    (x, attention_mask, is_causal) as PrefixAttention's.
    """
    pattern = re.compile(target_modules) if target_modules else None
    names = [name for name, module in model.named_modules()
             if name and (pattern.fullmatch(name) if pattern else _is_attention(module))]
    if not names:
        raise ValueError(f"inject_prefix_attention: no attention module found in {type(model).__name__} "
                         f"(target_modules={target_modules!r}); expected modules with q_proj, k_proj, "
                         "v_proj, out_proj (nn.Linear) and num_heads")
    for name in names:
        old = model.get_submodule(name)
        if not _is_attention(old):
            raise ValueError(f"inject_prefix_attention: {name!r} is a {type(old).__name__}, not an attention module "
                             "with q_proj, k_proj, v_proj, out_proj (nn.Linear) and num_heads")
        new = PrefixAttention(old.q_proj.in_features, old.num_heads, num_virtual_tokens, projection_dim,
                              bias=old.q_proj.bias is not None, dropout=getattr(old, "dropout_p", 0.0),
                              device=old.q_proj.weight.device)
        new.q_proj, new.k_proj, new.v_proj, new.out_proj = old.q_proj, old.k_proj, old.v_proj, old.out_proj
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


# ------------------------------------------------------------------------------------- training

_PROMPT_TYPES = (SoftPrompt, PrefixEncoder)


def prompt_modules(model: nn.Module) -> dict[str, SoftPrompt | PrefixEncoder]:
    """Every SoftPrompt and PrefixEncoder in `model` (itself included, as ""), by full module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _PROMPT_TYPES)}


def require_prompt_modules(caller: str, model: nn.Module) -> dict:
    modules = prompt_modules(model)
    if not modules:
        raise ValueError(f"{caller}: {type(model).__name__} has no SoftPrompt or PrefixEncoder")
    return modules


def mark_only_prompt_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter except those of the prompt modules."""
    modules = require_prompt_modules("mark_only_prompt_trainable", model)
    model.requires_grad_(False)
    for module in modules.values():
        module.requires_grad_(True)
    return model
