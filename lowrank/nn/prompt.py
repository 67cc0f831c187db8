"""Prompt tuning and prefix tuning modules: learned vectors the frozen model attends to.

    SoftPrompt       n learned token embeddings put in front of the input embeddings
                     (Lester et al. 2021): [B, T, D] -> [B, n+T, D].
    PrefixEncoder    n learned key/value pairs for every attention layer (Li & Liang 2021),
                     optionally produced by a reparameterising MLP; HF PEFT's PrefixEncoder
                     layout, so its parameters copy across one to one.
    PrefixAttention  multi-head self-attention whose keys and values start with a learned
                     prefix, for models that are not Hugging Face transformers.

Each keeps its learned tensors in float32 (as PEFT does) and casts them to the activations'
dtype where they are used. `prompt_config()` gives the hyperparameters that save_prompt writes
beside the weights, so load_prompt can tell a mismatched file from a matching one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftPrompt", "PrefixEncoder", "PrefixAttention"]

PROMPT_INITS = ("random", "vocab", "text")


def _check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def _text_token_ids(owner: str, init_text, tokenizer, count: int) -> list[int]:
    """PEFT's TEXT init: the tokenised text (special tokens included), cut or repeated to `count` ids."""
    if not isinstance(init_text, str) or not init_text:
        raise ValueError(f"{owner}: init='text' needs a non-empty init_text string, got {init_text!r}")
    if tokenizer is None:
        raise ValueError(f"{owner}: init='text' needs the model's tokenizer")
    ids = list(tokenizer(init_text)["input_ids"])
    if not ids:
        raise ValueError(f"{owner}: the tokenizer turned init_text {init_text!r} into no tokens")
    return (ids * math.ceil(count / len(ids)))[:count]


class SoftPrompt(nn.Module):
    """`num_virtual_tokens` learned embeddings of size `dim`, prepended to every sequence.

    init:
        "random"  standard normal, like nn.Embedding (PEFT's RANDOM init);
        "vocab"   rows of `embedding` (the model's input nn.Embedding) at token ids drawn
                  uniformly with replacement (PEFT's SAMPLE_VOCAB); `generator` seeds the draw;
        "text"    the embeddings of `tokenizer(init_text)` token ids, cut or repeated to
                  num_virtual_tokens (PEFT's TEXT).

    forward(embeds [B, T, dim]) -> [B, num_virtual_tokens + T, dim]. Masks and labels for the
    longer sequence come from `extend_attention_mask` / the HF wrapper PromptTuningModel.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        dim: int,
        init: str = "random",
        embedding: nn.Embedding | None = None,
        init_text: str | None = None,
        tokenizer=None,
        generator: torch.Generator | None = None,
        device=None,
    ):
        super().__init__()
        _check_positive_int("SoftPrompt", "num_virtual_tokens", num_virtual_tokens)
        _check_positive_int("SoftPrompt", "dim", dim)
        if init not in PROMPT_INITS:
            raise ValueError(f"SoftPrompt: init must be one of {PROMPT_INITS}, got {init!r}")
        self.num_virtual_tokens, self.dim = num_virtual_tokens, dim
        self.weight = nn.Parameter(torch.empty(num_virtual_tokens, dim, device=device, dtype=torch.float32))
        if init == "random":
            nn.init.normal_(self.weight, generator=generator)
            return
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(
                f"SoftPrompt: init={init!r} needs embedding=<the model's input nn.Embedding>, "
                f"got {type(embedding).__name__}"
            )
        if embedding.embedding_dim != dim:
            raise ValueError(
                f"SoftPrompt: the embedding has dim {embedding.embedding_dim}, but the prompt has dim {dim}; "
                "they must match"
            )
        if init == "vocab":
            ids = torch.randint(0, embedding.num_embeddings, (num_virtual_tokens,), generator=generator)
        else:
            ids = torch.tensor(_text_token_ids("SoftPrompt", init_text, tokenizer, num_virtual_tokens))
            if int(ids.max()) >= embedding.num_embeddings:
                raise ValueError(
                    f"SoftPrompt: the tokenizer gives token id {int(ids.max())}, but the embedding has only "
                    f"{embedding.num_embeddings} rows; pass the tokenizer that belongs to the model"
                )
        with torch.no_grad():
            self.weight.copy_(embedding(ids.to(embedding.weight.device)).float())

    def prompt_config(self) -> dict:
        return {"num_virtual_tokens": self.num_virtual_tokens, "dim": self.dim}

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.dim() != 3 or embeds.shape[-1] != self.dim:
            raise ValueError(
                f"SoftPrompt: embeds must be [batch, seq_len, {self.dim}], got {tuple(embeds.shape)}"
            )
        prompt = self.weight.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        return torch.cat((prompt, embeds), dim=1)

    def extend_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """[B, T] mask -> [B, n+T] with ones (attend) for the virtual tokens."""
        if mask.dim() != 2:
            raise ValueError(f"SoftPrompt: the attention mask must be [batch, seq_len], got {tuple(mask.shape)}")
        return torch.cat((mask.new_ones(mask.shape[0], self.num_virtual_tokens), mask), dim=1)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.dim}"


class PrefixEncoder(nn.Module):
    """Learned key/value prefixes for `num_layers` attention layers of `num_heads` × `head_dim`.

    Without projection_dim, `embedding` [n, num_layers·2·num_heads·head_dim] holds the prefixes
    themselves. With it, `embedding` [n, num_heads·head_dim] feeds the reparameterising MLP
    `transform` = Linear(→ projection_dim) → Tanh → Linear(→ num_layers·2·num_heads·head_dim),
    which Li & Liang found trains more stably. Both are PEFT's PrefixEncoder, parameter names
    included; the flat layout per virtual token is [layer][key, value][head][head_dim].

    forward(batch_size) -> one (key, value) pair per layer, each [batch_size, num_heads, n, head_dim]
    (a broadcast view over the batch).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        projection_dim: int | None = None,
        device=None,
    ):
        super().__init__()
        for name, value in (
            ("num_virtual_tokens", num_virtual_tokens),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
        ):
            _check_positive_int("PrefixEncoder", name, value)
        if projection_dim is not None:
            _check_positive_int("PrefixEncoder", "projection_dim", projection_dim)
        self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
        self.num_heads, self.head_dim, self.projection_dim = num_heads, head_dim, projection_dim
        token_dim = num_heads * head_dim
        flat_dim = num_layers * 2 * token_dim
        factory = {"device": device, "dtype": torch.float32}
        if projection_dim is None:
            self.embedding = nn.Embedding(num_virtual_tokens, flat_dim, **factory)
            self.transform = None
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, projection_dim, **factory),
                nn.Tanh(),
                nn.Linear(projection_dim, flat_dim, **factory),
            )

    def prompt_config(self) -> dict:
        return {
            "num_virtual_tokens": self.num_virtual_tokens,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "projection_dim": self.projection_dim,
        }

    def forward(self, batch_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        flat = self.embedding.weight if self.transform is None else self.transform(self.embedding.weight)
        n, heads = self.num_virtual_tokens, self.num_heads
        per_layer = flat.view(n, self.num_layers * 2, heads, self.head_dim).permute(1, 2, 0, 3)
        per_layer = per_layer.unsqueeze(1).expand(-1, batch_size, heads, n, self.head_dim)
        return tuple((per_layer[2 * i], per_layer[2 * i + 1]) for i in range(self.num_layers))

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.prompt_config().items())


class PrefixAttention(nn.Module):
    """Multi-head self-attention over [prefix keys/values; the sequence's keys/values].

    forward(x [B, T, embed_dim], attention_mask [B, T] (nonzero = attend) or None,
    is_causal=False) -> [B, T, embed_dim]. Every query sees all prefix positions; the mask
    and causality apply to the real positions only. The projections are ordinary Linear
    layers; the prefix lives in `prefix` (a one-layer PrefixEncoder), which is what
    mark_only_prompt_trainable leaves trainable and save_prompt writes.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_virtual_tokens: int,
        projection_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_positive_int("PrefixAttention", "embed_dim", embed_dim)
        _check_positive_int("PrefixAttention", "num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"PrefixAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"PrefixAttention: dropout must be a probability in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.prefix = PrefixEncoder(num_virtual_tokens, 1, num_heads, self.head_dim, projection_dim, device=device)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, is_causal: bool = False):
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"PrefixAttention: x must be [batch, seq_len, {self.embed_dim}], got {tuple(x.shape)}")
        batch, seq_len, _ = x.shape
        n = self.prefix.num_virtual_tokens
        ((prefix_key, prefix_value),) = self.prefix(batch)
        q = self._heads(self.q_proj(x))
        k = torch.cat((prefix_key.to(x.dtype), self._heads(self.k_proj(x))), dim=2)
        v = torch.cat((prefix_value.to(x.dtype), self._heads(self.v_proj(x))), dim=2)

        keep = torch.ones(seq_len, n + seq_len, dtype=torch.bool, device=x.device)
        if is_causal:  # real query i sees real keys 0..i (and the whole prefix)
            keep[:, n:] = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril()
        if attention_mask is not None:
            if attention_mask.shape != (batch, seq_len):
                raise ValueError(
                    f"PrefixAttention: attention_mask must be [batch, seq_len] = {(batch, seq_len)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            padding = torch.cat((attention_mask.new_ones(batch, n), attention_mask), dim=1).bool()
            keep = keep & padding[:, None, None, :]
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"
