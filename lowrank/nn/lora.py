"""LoRA drop-in layers: each subclasses (or mirrors) the layer it replaces and keeps its
constructor and state_dict keys, adding low-rank adapters beside them (as in loralib).

    out = base(x) + Σ over active adapters  scaling · B(A(dropout(x)))

scaling is alpha / r, or alpha / √r for an adapter with use_rslora (rank-stabilised LoRA, as PEFT).
The base weight is frozen on construction. Initialisation follows HF PEFT: for Linear, Conv1D
and Conv2d A is kaiming-uniform and B is zero; for Embedding A is zero and B is standard
normal. Either way the layer starts out computing exactly what the base layer computes.
init_lora_weights="pissa" (Linear, Conv1D) takes A and B from the top-r SVD of the weight and
leaves the residual in the weight (PiSSA; "pissa_niter_K": K subspace iterations of a randomised
SVD instead), as PEFT does.

DoRA (use_dora=True; Linear and Conv1D): the adapter also has a magnitude m [out_features] (PEFT's
lora_magnitude_vector, initialised to ‖W + s·B·A‖ of each output row) and the layer computes
g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b with g = m / ‖W + s·B·A‖_row, through the fused lowrank.ops.dora_linear
with ‖W‖²_row cached per layer (WeightNormCache: recomputed only when the weight changes). One DoRA
adapter runs at a time; other running adapters add their terms to its output (PEFT computes the
same when the DoRA adapter is first in its active list). A layer has DoRA or PiSSA adapters, not both.

Named adapters. A layer holds any number of adapters by name (`lora_adapters`: name -> their
settings, in the order they were added); `active_adapters` run in forward, the others are kept.
Their tensors are registered flat on the layer:

    adapter "default"    lora_A, lora_B, (pissa_A0, pissa_B0), (lora_magnitude_vector, lora_dora_scale)
    adapter "<name>"     lora_A_<name>, lora_B_<name>, (pissa_A0_<name>, ...), (lora_magnitude_vector_<name>, ...)

so a single-adapter layer has exactly the keys it always had and existing checkpoints with
`<layer>.lora_A` / `.lora_B` load into its "default" adapter unchanged. (No part name is a prefix
of another one followed by "_", so no two adapters' keys can collide.) pissa_A0 / pissa_B0 are
the PiSSA adapter's initial A and B (buffers): scaling · B0·A0 is the part of the original weight
that the adapter took out, so it is added back whenever that adapter is not running (inactive or
disabled), and save_lora writes the adapter as a plain LoRA delta on the original weight.
lora_magnitude_vector is a DoRA adapter's m (a Parameter, trained with A and B); lora_dora_scale
is the g of a merged DoRA adapter (a buffer, present only while it is merged).

Several active adapters run as one adapter of rank Σr: their A's are concatenated along r and
their B's, each multiplied by its scaling, likewise, so a Linear / Conv1D layer makes one fused
lora_linear call and no extra pass over [M, N]. lora_linear draws one dropout mask for that call,
so in training the adapters that share a dropout rate share a mask (PEFT draws one per adapter);
each further dropout rate adds a plain PyTorch term (one more pass over [M, N]). At inference
there is no dropout and always a single call.

Mixed batches (lowrank.adapter_batch sets `row_adapters`): each row of the input (its leading
dimension) runs its own adapter, whatever the active ones, as PEFT's `adapter_names`: Linear and
Conv1D in one fused multi_lora_linear call (the row adapters' A and B stacked, zero-padded to the
largest rank, so gradients flow to each adapter from its own rows), Embedding and Conv2d one term
per adapter on its rows. Rows with no adapter of this layer get the base output.

merge() folds the active adapters into the base weight (computed in float32 or wider, rounded
once to the weight dtype) so inference runs the plain base layer; unmerge() subtracts the same,
recomputed deltas in reverse order. The delta is a deterministic function of A and B, so
repeated merge/unmerge cycles do not accumulate error: the weight settles after the first cycle,
within one rounding of the original. (Remembering the delta actually applied in the weight
dtype instead makes the error random-walk, measurably so.) A DoRA adapter merges first, onto the
unmerged weight: W' = g ⊙ (W + s·B·A) (+ the plain adapters' deltas, as the forward adds them), and
unmerges as W = W'/g − s·B·A with the g of its merge (the norm of W cannot be recomputed from W'):
within one rounding, not bit for bit.

Which adapters are merged is part of the state_dict: a merged layer's state_dict carries
`lora_merged` (`lora_merged_<name>`: the adapter's position in the merge order), absent when
nothing is merged. load_state_dict adopts the merged state that comes with the weight it loads,
so a merged model's state_dict loaded into an unmerged LoRA model is merged there too instead
of getting the update applied twice; LoRA tensors loaded without the base weight into a layer
whose weight holds their old values merged are refused.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _backends
from lowrank.ops import dora_linear, lora_linear, multi_lora_linear
from lowrank.ops.dora_linear import WeightNormCache, dora_magnitude, dora_merged_weight, dora_unmerged_weight

__all__ = [
    "LoRAAdapter", "LoRALayer", "LoRALinear", "LoRAEmbedding", "LoRAConv1D", "LoRAConv2d", "is_hf_conv1d",
    "DEFAULT_ADAPTER", "RowAdapters",
]

DEFAULT_ADAPTER = "default"
MERGED = "lora_merged"
DORA_MAGNITUDE = "lora_magnitude_vector"  # DoRA's m [out_features], PEFT's name
DORA_SCALE = "lora_dora_scale"  # g = m / ‖W + s·B·A‖_row of a merged DoRA adapter, the unmerge needs it
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def adapter_key(part: str, adapter_name: str) -> str:
    """The attribute (and state_dict key) of an adapter's tensor `part` ("lora_A", "lora_B", ...)."""
    return part if adapter_name == DEFAULT_ADAPTER else f"{part}_{adapter_name}"


def check_adapter_name(owner: str, adapter_name) -> None:
    """Raise ValueError naming `owner` unless the name can key tensors and name a folder."""
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
        raise ValueError(
            f"{owner}: adapter_name must be a non-empty string of letters, digits, '_' and '-', got {adapter_name!r}"
        )


def check_lora_hyperparameters(owner: str, r, alpha, dropout) -> None:
    """Raise ValueError naming `owner` when r, alpha or dropout is out of range."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{owner}: r (LoRA rank) must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{owner}: alpha must be a positive finite number (scaling = alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be a probability in [0, 1), got {dropout!r}")


def pissa_iterations(init_lora_weights) -> Union[int, None]:
    """None for "pissa" (a full SVD), K for "pissa_niter_K"; raise ValueError for anything else."""
    if init_lora_weights == "pissa":
        return None
    match = _PISSA_NITER.fullmatch(init_lora_weights) if isinstance(init_lora_weights, str) else None
    if match is None:
        raise ValueError(
            f"init_lora_weights must be True, 'pissa' or 'pissa_niter_<K>' (K a non-negative integer), "
            f"got {init_lora_weights!r}"
        )
    return int(match[1])


def is_pissa(init_lora_weights) -> bool:
    return isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa")


@dataclass
class LoRAAdapter:
    """One adapter's settings (its tensors live on the layer, see adapter_key)."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


@dataclass(frozen=True)
class RowAdapters:
    """A mixed batch as one LoRA layer sees it: `names`, this layer's adapters that some row uses, and
    `index` [rows] (int64), each row's position in `names` or -1 (no adapter of this layer)."""

    names: tuple[str, ...]
    index: torch.Tensor
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    def index_on(self, device: torch.device) -> torch.Tensor:
        """`index` on `device`, copied there once per batch rather than once per layer call."""
        if device not in self._on_device:
            self._on_device[device] = self.index.to(device)
        return self._on_device[device]


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D (checked without importing transformers:
    an instance can only exist if transformers.pytorch_utils was already imported)."""
    conv1d_class = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d_class is not None and isinstance(module, conv1d_class)


def _check_base(owner: str, base: nn.Module, expected: str, is_expected: bool) -> None:
    if isinstance(base, LoRALayer):
        raise TypeError(f"{owner}: the module already has LoRA ({type(base).__name__}); wrap a plain {expected}")
    if not is_expected:
        raise TypeError(f"{owner}: expected a {expected}, got {type(base).__name__}")


# A low-rank term of the forward: (A, B, scaling, dropout probability).
LowRankTerm = tuple[torch.Tensor, torch.Tensor, float, float]


class LoRALayer:
    """State, adapter management and merge logic shared by every LoRA layer (a mixin in front of
    the base class).

    Subclasses own `weight`, implement `_adapter_shapes(r)` and `delta_weight(name)`, and call
    `_init_lora(adapter_name, r, alpha, dropout, **options)` after building the base layer. Their
    from_<base> constructors build the layer on the meta device (nothing allocated), hand it the
    base layer's Parameters, then create the adapter beside them (`_rebuild_adapter`).
    """

    lora_adapters: dict[str, LoRAAdapter]
    active_adapters: list[str]
    merged_adapters: list[str]
    adapters_disabled: bool
    row_adapters: Optional[RowAdapters] = None  # set inside lowrank.adapter_batch
    supports_pissa = supports_dora = False
    feature_dims = 1  # trailing input dimensions of one row's features (Embedding: 0, Conv2d: 3)

    def _init_lora(self, adapter_name, r, alpha, dropout, **options) -> None:
        self.lora_adapters, self.active_adapters, self.merged_adapters = {}, [], []
        self.adapters_disabled = False
        self._weight_norm_sq = WeightNormCache()  # ‖W‖²_row of the frozen weight, for DoRA
        self.register_state_dict_post_hook(_record_merged_adapters)
        self.register_load_state_dict_pre_hook(_adopt_merged_adapters)
        self.add_adapter(adapter_name, r, alpha, dropout, **options)

    def _rebuild_adapter(self, adapter_name, r, alpha, dropout, options) -> None:
        """After the base Parameters were swapped in: the meta-device adapter made again beside them."""
        self._remove_adapter_tensors(adapter_name)
        self.lora_adapters, self.active_adapters = {}, []
        self.add_adapter(adapter_name, r, alpha, dropout, **options)

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self, adapter_name, r, alpha, dropout=0.0, *, use_rslora=False, init_lora_weights=True, use_dora=False
    ) -> None:
        """Add an adapter; the layer's first adapter becomes active, later ones are added inactive
        and frozen (set_adapter activates them), as PEFT's add_adapter. use_dora: DoRA, whose
        magnitude starts at ‖W + s·B·A‖_row (PEFT's init), so the layer's output does not change."""
        self.check_new_adapter(adapter_name, r, alpha, dropout, use_rslora, init_lora_weights, use_dora)
        adapter = LoRAAdapter(r, alpha, float(dropout), use_rslora, init_lora_weights, use_dora)
        a_shape, b_shape = self._adapter_shapes(r)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        active = not self.active_adapters
        for part, shape in (("lora_A", a_shape), ("lora_B", b_shape)):
            tensor = nn.Parameter(torch.empty(shape, **factory), requires_grad=active)
            self.register_parameter(adapter_key(part, adapter_name), tensor)
        self.lora_adapters[adapter_name] = adapter
        if active:
            self.active_adapters = [adapter_name]
        self.weight.requires_grad_(False)
        if is_pissa(init_lora_weights):
            self._pissa_init(adapter_name)
        else:
            self.reset_lora_parameters(adapter_name)
        if use_dora:
            weight = self._weight_out_in()
            magnitude = dora_magnitude(weight, *self.lora_parameters(adapter_name), adapter.scaling,
                                       self._weight_norm_sq(weight))  # fmt: skip
            self.register_parameter(adapter_key(DORA_MAGNITUDE, adapter_name), nn.Parameter(magnitude, active))

    def check_new_adapter(
        self, adapter_name, r, alpha, dropout, use_rslora=False, init_lora_weights=True, use_dora=False
    ) -> None:
        """Raise (naming the layer class) unless add_adapter would accept these arguments."""
        if adapter_name in self.lora_adapters:
            raise ValueError(f"{type(self).__name__}: the layer already has LoRA adapter {adapter_name!r}")
        if use_dora and self.merged_adapters:  # the magnitude starts from the unmerged weight's norm
            raise ValueError(f"{type(self).__name__}: unmerge before adding a DoRA adapter")
        self.check_adapter_options(
            self.weight, self.lora_adapters.values(), adapter_name, r, alpha, dropout, use_rslora, init_lora_weights,
            use_dora,
        )  # fmt: skip

    @classmethod
    def check_adapter_options(
        cls, weight, others, adapter_name, r, alpha, dropout, use_rslora=False, init_lora_weights=True,
        use_dora=False,
    ) -> None:  # fmt: skip
        """Raise (naming the layer class) unless an adapter with these arguments can join the layer with this
        base weight and these `others` (LoRAAdapter); also checks a module that is not a LoRA layer yet."""
        owner = cls.__name__
        check_adapter_name(owner, adapter_name)
        check_lora_hyperparameters(owner, r, alpha, dropout)
        for option, value in (("use_rslora", use_rslora), ("use_dora", use_dora)):
            if not isinstance(value, bool):
                raise TypeError(f"{owner}: {option} must be True or False, got {value!r}")
        if init_lora_weights is not True:
            pissa_iterations(init_lora_weights)
            if not cls.supports_pissa:
                raise ValueError(f"{owner}: PiSSA init is implemented for Linear and Conv1D layers only")
            if r > min(weight.shape):
                raise ValueError(f"{owner}: PiSSA needs r <= min(weight shape) = {min(weight.shape)}, got r={r}")
        if use_dora and not cls.supports_dora:
            raise ValueError(f"{owner}: DoRA is implemented for Linear and Conv1D layers only (PEFT also has it for "
                             "Embedding and Conv layers; lowrank does not)")  # fmt: skip
        adapters = [*others, LoRAAdapter(r, alpha, dropout, use_rslora, init_lora_weights, use_dora)]
        if any(a.use_dora for a in adapters) and any(is_pissa(a.init_lora_weights) for a in adapters):
            # DoRA's norm is of the base weight, which a PiSSA adapter turns into a residual.
            raise ValueError(f"{owner}: DoRA and PiSSA adapters cannot share a layer")

    def lora_parameters(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) of an adapter."""
        self._require_adapter(adapter_name)
        return getattr(self, adapter_key("lora_A", adapter_name)), getattr(self, adapter_key("lora_B", adapter_name))

    def adapter_parts(self, adapter_name: str) -> list[str]:
        """The names of an adapter's trained tensors: lora_A, lora_B and, for DoRA, lora_magnitude_vector."""
        return ["lora_A", "lora_B", *([DORA_MAGNITUDE] if self.lora_adapters[adapter_name].use_dora else [])]

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every trained tensor of an adapter: A, B and, for DoRA, the magnitude."""
        self._require_adapter(adapter_name)
        return [getattr(self, adapter_key(part, adapter_name)) for part in self.adapter_parts(adapter_name)]

    def dora_magnitude(self, adapter_name: str) -> nn.Parameter:
        """m [out_features] of a DoRA adapter (PEFT's lora_magnitude_vector)."""
        return getattr(self, adapter_key(DORA_MAGNITUDE, adapter_name))

    def pissa_initial(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A0, B0) of a PiSSA adapter: its values right after the SVD init."""
        return tuple(getattr(self, adapter_key(part, adapter_name)) for part in ("pissa_A0", "pissa_B0"))

    def set_adapter(self, adapter_names) -> None:
        """Make these adapters (a name or a list; names this layer lacks are allowed, as in PEFT, and
        do nothing here) the active ones, trainable, and every other adapter frozen. The caller
        unmerges first (lowrank.set_adapter does)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self.merged_adapters:
            raise ValueError(f"{type(self).__name__}: unmerge before changing the active adapters")
        self.check_active_adapters(names)
        self.active_adapters = names
        for name in self.lora_adapters:
            for param in self.adapter_parameters(name):
                param.requires_grad_(name in names)

    def check_active_adapters(self, names: list[str]) -> None:
        """Raise unless these adapters can run together: at most one DoRA adapter (its output is scaled by its g;
        another DoRA adapter would scale it again, in an order PEFT's active list decides)."""
        dora = [name for name in names if name in self.lora_adapters and self.lora_adapters[name].use_dora]
        if len(dora) > 1:
            raise ValueError(f"{type(self).__name__}: one DoRA adapter can be active at a time, got {dora}")

    def check_mixed_batch(self, adapter_names: list[str]) -> None:
        """Raise unless a batch whose rows use these adapters can run: nothing merged (PEFT also refuses), none of
        them DoRA (PEFT refuses too), no PiSSA adapter on the layer (its initial part would have to be added back
        on every row that does not run it)."""
        owner = type(self).__name__
        if self.merged_adapters:
            raise ValueError(f"{owner}: adapters {self.merged_adapters} are merged; unmerge before a mixed batch")
        dora = [name for name in adapter_names if name in self.lora_adapters and self.lora_adapters[name].use_dora]
        if dora:
            raise ValueError(f"{owner}: DoRA adapter {dora[0]!r} cannot run in a mixed batch (as in PEFT)")
        pissa = [name for name, adapter in self.lora_adapters.items() if is_pissa(adapter.init_lora_weights)]
        if pissa:
            raise ValueError(f"{owner}: the layer has PiSSA adapter {pissa[0]!r}, which mixed batches do not support")

    def _mixed_batch(self) -> Optional[RowAdapters]:
        """The row adapters of a running mixed batch (None outside one, and while the adapters are disabled)."""
        return None if self.adapters_disabled else self.row_adapters

    def _row_index(self, x: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """Each row's adapter position [rows] on x's device, after checking that x has one row per name."""
        if x.dim() <= self.feature_dims or x.shape[0] != rows.index.numel():
            raise ValueError(
                f"{type(self).__name__}: adapter_batch has {rows.index.numel()} adapter names, one per row, but the "
                f"layer's input has shape {tuple(x.shape)}; rows are its leading dimension"
            )
        return rows.index_on(x.device)

    def _row_adapter_stack(self, rows: RowAdapters) -> tuple[torch.Tensor, torch.Tensor]:
        """The row adapters' A [n, r_max, in] and B [n, out, r_max], zero-padded to the largest rank (the padding
        gets zero gradient, see lowrank.ops.multi_lora_linear)."""
        rank = max(self.lora_adapters[name].r for name in rows.names)
        stacks = ([], [])
        for name in rows.names:
            lora_A, lora_B = self.lora_parameters(name)
            padding = rank - self.lora_adapters[name].r
            stacks[0].append(F.pad(lora_A, (0, 0, 0, padding)))
            stacks[1].append(F.pad(lora_B, (0, padding)))
        return torch.stack(stacks[0]), torch.stack(stacks[1])

    def _add_each_term(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + every low-rank term, one pass each; in a mixed batch, each row adapter's term on its own rows
        (Embedding and Conv2d: their _low_rank_term(x, A, B, scaling, dropout) is scaling · B(A(dropout(x))))."""
        rows = self._mixed_batch()
        if rows is None:
            for term in self._lora_terms():
                out = out + self._low_rank_term(x, *term)
            return out
        index = self._row_index(x, rows)
        for position, name in enumerate(rows.names):
            adapter, selected = self.lora_adapters[name], (index == position).nonzero().squeeze(1)
            lora_A, lora_B = self.lora_parameters(name)
            term = self._low_rank_term(x[selected], lora_A, lora_B, adapter.scaling, self._dropout(adapter))
            out = out.index_add(0, selected, term.to(out.dtype))
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (not while merged). A PiSSA adapter's initial part goes back into the
        weight, which then holds the original weight again (within one rounding)."""
        self._require_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{type(self).__name__}: adapter {adapter_name!r} is merged; unmerge it first")
        if is_pissa(self.lora_adapters[adapter_name].init_lora_weights):
            initial_A, initial_B = self.pissa_initial(adapter_name)
            with torch.no_grad():
                scaling = self.lora_adapters[adapter_name].scaling
                self.weight.copy_(self.weight + self._delta_layout(scaling * self._product(initial_B, initial_A)))
        self._remove_adapter_tensors(adapter_name)
        del self.lora_adapters[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    def _remove_adapter_tensors(self, adapter_name: str) -> None:
        for part in ("lora_A", "lora_B", DORA_MAGNITUDE, DORA_SCALE, "pissa_A0", "pissa_B0"):
            key = adapter_key(part, adapter_name)
            self._parameters.pop(key, None)
            self._buffers.pop(key, None)

    def _require_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_adapters:
            raise KeyError(
                f"{type(self).__name__}: no LoRA adapter {adapter_name!r}; it has {list(self.lora_adapters)}"
            )

    def _only_adapter(self) -> LoRAAdapter:
        if len(self.lora_adapters) != 1:  # (an AttributeError would be swallowed by nn.Module.__getattr__)
            raise ValueError(
                f"{type(self).__name__} has the adapters {list(self.lora_adapters)}; "
                "read their settings from lora_adapters[name]"
            )
        return next(iter(self.lora_adapters.values()))

    # A single-adapter layer's settings, read directly (layer.r, layer.scaling, ...).
    r = property(lambda self: self._only_adapter().r)
    alpha = property(lambda self: self._only_adapter().alpha)
    dropout = property(lambda self: self._only_adapter().dropout)
    scaling = property(lambda self: self._only_adapter().scaling)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ init

    def reset_lora_parameters(self, adapter_name: str) -> None:
        """PEFT's default init: A kaiming-uniform, B zero (Embedding overrides)."""
        lora_A, lora_B = self.lora_parameters(adapter_name)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.zeros_(lora_B)

    @torch.no_grad()
    def _pissa_init(self, adapter_name: str) -> None:
        """PEFT's pissa_init: W = U·S·Vh, A = √(S_r/s)·Vh_r, B = U_r·√(S_r/s), W ← W − s·B·A."""
        adapter = self.lora_adapters[adapter_name]
        iterations = pissa_iterations(adapter.init_lora_weights)
        weight = self._weight_out_in()
        W = weight.to(torch.promote_types(weight.dtype, torch.float32))
        if iterations is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U_r, S_r, Vh_r = U[:, : adapter.r], S[: adapter.r] / adapter.scaling, Vh[: adapter.r]
        else:
            U_r, S_r, V_r = torch.svd_lowrank(W, adapter.r, niter=iterations)
            S_r, Vh_r = S_r / adapter.scaling, V_r.t()
        lora_A, lora_B = self.lora_parameters(adapter_name)
        lora_A.copy_(torch.diag(torch.sqrt(S_r)) @ Vh_r)
        lora_B.copy_(U_r @ torch.diag(torch.sqrt(S_r)))
        weight.copy_(W - adapter.scaling * lora_B.to(W.dtype) @ lora_A.to(W.dtype))
        self.register_buffer(adapter_key("pissa_A0", adapter_name), lora_A.detach().clone())
        self.register_buffer(adapter_key("pissa_B0", adapter_name), lora_B.detach().clone())

    def _weight_out_in(self) -> torch.Tensor:
        """The base weight as [out, in] (a view for layouts that store it transposed)."""
        return self.weight

    # ------------------------------------------------------------------ forward terms and merging

    def _running(self) -> list[str]:
        """The adapters the forward runs: active, enabled, not merged."""
        if self.adapters_disabled:
            return []
        merged = self.merged_adapters
        return [name for name in self.active_adapters if name in self.lora_adapters and name not in merged]

    def _dropout(self, adapter: LoRAAdapter) -> float:
        return adapter.dropout if self.training else 0.0

    def _lora_terms(self) -> list[LowRankTerm]:
        """Every low-rank term the forward adds to the base layer: the running plain (not DoRA) adapters
        and the initial part of each PiSSA adapter that is not running."""
        running, terms = self._running(), []
        for name, adapter in self.lora_adapters.items():
            if name in running and not adapter.use_dora:
                terms.append((*self.lora_parameters(name), adapter.scaling, self._dropout(adapter)))
            elif is_pissa(adapter.init_lora_weights) and name not in running and name not in self.merged_adapters:
                terms.append((*self.pissa_initial(name), adapter.scaling, 0.0))
        return terms

    def _linear_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Linear and Conv1D (weight [out, in]): without a running DoRA adapter, the base layer and the low-rank
        terms in fused lora_linear calls; with one, its fused dora_linear call (‖W‖² from the layer's cache)
        and the other adapters' terms added to its output."""
        rows = self._mixed_batch()
        if rows is not None:
            return self._mixed_batch_linear(x, weight, rows)
        dora = [name for name in self._running() if self.lora_adapters[name].use_dora]
        terms = self._lora_terms()
        if not dora:
            return linear_with_terms(x, weight, self.bias, terms, self.backend)
        adapter = self.lora_adapters[dora[0]]
        out = dora_linear(
            x, weight, self.bias, *self.lora_parameters(dora[0]), self.dora_magnitude(dora[0]), adapter.scaling,
            self._dropout(adapter), weight_norm_sq=self._weight_norm_sq(weight), backend=self.backend,
        )  # fmt: skip
        return add_low_rank_terms(out, x, _dropout_groups(terms))

    def _mixed_batch_linear(self, x: torch.Tensor, weight: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """Linear and Conv1D in a mixed batch: one fused multi_lora_linear call, the row index spread over every
        position of a row (a sequence's tokens)."""
        index = self._row_index(x, rows)
        if not rows.names:
            return F.linear(x, weight, self.bias)
        adapters = [self.lora_adapters[name] for name in rows.names]
        index = index.view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])
        return multi_lora_linear(
            x, weight, self.bias, index, *self._row_adapter_stack(rows), [a.scaling for a in adapters],
            [self._dropout(a) for a in adapters], backend=self.backend,
        )  # fmt: skip

    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def _product(self, lora_B: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        """B·A in float32 or wider, [out, in]-shaped (Conv2d overrides for its 4-D layout)."""
        dtype = self._compute_dtype()
        return lora_B.to(dtype) @ lora_A.to(dtype)

    def _delta_layout(self, product: torch.Tensor) -> torch.Tensor:
        """A B·A product in the base weight's layout (Linear: as it is)."""
        return product

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling · B·A of an adapter in the base weight's layout, in float32 (float64 for float64 weights)."""
        lora_A, lora_B = self.lora_parameters(adapter_name)
        return self._delta_layout(self.lora_adapters[adapter_name].scaling * self._product(lora_B, lora_A))

    @torch.no_grad()
    def merge(self, adapter_names=None) -> None:
        """Fold adapters (default: the active ones this layer has) into the base weight; merged ones are skipped.

        A DoRA adapter merges first, onto the unmerged weight (adapters merged before are taken out and put
        back after it): W' = g ⊙ (W + s·B·A) + the plain adapters' deltas, which is what the forward computes.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        names = [name for name in names if name in self.lora_adapters and name not in self.merged_adapters]
        if not names:
            return
        owner = type(self).__name__
        if self.adapters_disabled:
            raise ValueError(f"{owner}: cannot merge while the adapters are disabled")
        dora = [name for name in self.merged_adapters + names if self.lora_adapters[name].use_dora]
        if len(dora) > 1:
            raise ValueError(f"{owner}: one DoRA adapter can be merged at a time, got {dora}")
        left_running = [name for name in self._running() if self.lora_adapters[name].use_dora and name not in names]
        if left_running:  # its norm would be taken of the merged weight
            raise ValueError(f"{owner}: merge the running DoRA adapter {left_running[0]!r} too, or first")
        if dora and dora[0] in names:
            replay = list(self.merged_adapters)
            self.unmerge()
            names = dora + replay + [name for name in names if name != dora[0]]
        for name in names:
            adapter = self.lora_adapters[name]
            if adapter.use_dora:  # g is kept as a buffer: the unmerge needs it, and it travels with the state_dict
                weight = self._weight_out_in()
                merged, scale = dora_merged_weight(weight, *self.lora_parameters(name), self.dora_magnitude(name),
                                                   adapter.scaling, self._weight_norm_sq(weight))  # fmt: skip
                weight.copy_(merged)
                self.register_buffer(adapter_key(DORA_SCALE, name), scale)
            else:
                self.weight.copy_(torch.add(self.weight, self.delta_weight(name)))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight, last merged first (DoRA: W = W'/g − s·B·A with
        the merge's g, since the norm of W cannot be recomputed from W')."""
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            adapter = self.lora_adapters[name]
            if adapter.use_dora:
                weight, scale = self._weight_out_in(), getattr(self, adapter_key(DORA_SCALE, name))
                weight.copy_(dora_unmerged_weight(weight, *self.lora_parameters(name), scale, adapter.scaling))
                del self._buffers[adapter_key(DORA_SCALE, name)]
            else:
                self.weight.copy_(torch.sub(self.weight, self.delta_weight(name)))
            self.merged_adapters.pop()

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{name}(r={a.r}, alpha={a.alpha}, dropout={a.dropout}"
            + (", rslora" if a.use_rslora else "")
            + (", dora" if a.use_dora else "")
            + (f", init={a.init_lora_weights}" if a.init_lora_weights is not True else "")
            + ")"
            for name, a in self.lora_adapters.items()
        )
        return (
            f"{self._base_repr()}, adapters=[{adapters}], active={self.active_adapters}, merged={self.merged_adapters}"
            + (", disabled" if self.adapters_disabled else "")
        )

    def _base_repr(self) -> str:
        return super().extra_repr()


def _record_merged_adapters(module: LoRALayer, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the merged adapters, by merge position (no key when nothing is merged)."""
    for position, name in enumerate(module.merged_adapters):
        state_dict[prefix + adapter_key(MERGED, name)] = torch.tensor(position)


def _adopt_merged_adapters(module: LoRALayer, state_dict, prefix, *_) -> None:
    """load_state_dict pre-hook: take the merged state that comes with the base weight (see the module docstring)."""
    incoming = {}
    for key in [key for key in state_dict if key.startswith(prefix + MERGED)]:
        part = key[len(prefix) :]
        name = DEFAULT_ADAPTER if part == MERGED else part[len(MERGED) + 1 :]
        incoming[name] = int(state_dict.pop(key))
    if prefix + "weight" not in state_dict:  # the base weight stays: so does what it holds
        stale = [
            name for name in module.merged_adapters
            if any(prefix + adapter_key(part, name) in state_dict for part in module.adapter_parts(name))
        ]  # fmt: skip
        if stale:
            raise ValueError(
                f"load_state_dict: {prefix or 'the layer'} has adapters {stale} merged into its weight, and the "
                f"state_dict replaces their A / B (DoRA: magnitude) but not {prefix}weight; unmerge first"
            )
        return
    merged = sorted(incoming, key=incoming.get)
    for name in merged:
        parts = module.adapter_parts(name) if name in module.lora_adapters else []
        if parts and module.lora_adapters[name].use_dora:
            parts.append(DORA_SCALE)
        missing = [key for key in (prefix + adapter_key(part, name) for part in parts) if key not in state_dict]
        if name not in module.lora_adapters or missing:
            problem = "the layer has no such adapter" if name not in module.lora_adapters else f"it lacks {missing}"
            raise ValueError(
                f"load_state_dict: {prefix}weight has adapter {name!r} merged into it "
                f"({prefix + adapter_key(MERGED, name)}), but {problem}; load it into a model with that adapter, "
                "or unmerge before saving"
            )
    for name in module.merged_adapters:  # the g of merges the loaded weight does not hold
        module._buffers.pop(adapter_key(DORA_SCALE, name), None)
    for name in merged:  # room for the g of the loaded weight's DoRA merge, which load_state_dict then copies
        if module.lora_adapters[name].use_dora:
            key = adapter_key(DORA_SCALE, name)
            module.register_buffer(key, torch.empty_like(state_dict[prefix + key], device=module.weight.device))
    module.merged_adapters = merged


def _dropout_groups(terms: list[LowRankTerm]) -> list[list[LowRankTerm]]:
    groups: dict[float, list[LowRankTerm]] = {}
    for term in terms:
        groups.setdefault(term[3], []).append(term)
    return list(groups.values())


def _concatenated(terms: list[LowRankTerm]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Terms sharing a dropout rate as one of rank Σr: A's stacked, B's (times their scaling) side by side."""
    if len(terms) == 1:
        lora_A, lora_B, scaling, _ = terms[0]
        return lora_A, lora_B, scaling
    lora_A = torch.cat([term[0] for term in terms])
    lora_B = torch.cat([term[1] * term[2] for term in terms], dim=1)
    return lora_A, lora_B, 1.0


def add_low_rank_terms(out, x, groups: list[list[LowRankTerm]]) -> torch.Tensor:
    """out + each group's scaling·(dropout(x)·Aᵀ)·Bᵀ in plain PyTorch: one more pass over [M, N] per group."""
    for group in groups:
        lora_A, lora_B, scaling = _concatenated(group)
        out = out + scaling * ((F.dropout(x, group[0][3], training=True) @ lora_A.t()) @ lora_B.t())
    return out


def linear_with_terms(x, weight, bias, terms: list[LowRankTerm], backend) -> torch.Tensor:
    """x·Wᵀ + b + the low-rank terms: one fused lora_linear call per dropout rate (see the module docstring)."""
    if not terms:
        return F.linear(x, weight, bias)
    first, *others = _dropout_groups(terms)
    lora_A, lora_B, scaling = _concatenated(first)
    out = lora_linear(x, weight, bias, lora_A, lora_B, scaling, first[0][3], backend=backend)
    return add_low_rank_terms(out, x, others)


class LoRALinear(LoRALayer, nn.Linear):
    """nn.Linear with LoRA adapters: lora_A [r, in_features], lora_B [out_features, r] each."""

    supports_pissa = supports_dora = True

    def __init__(
        self, in_features, out_features, r=8, alpha=16, dropout=0.0, bias=True, device=None, dtype=None, backend=None,
        *, adapter_name=DEFAULT_ADAPTER, **adapter_options,
    ):  # fmt: skip
        _backends.check_name(type(self).__name__, backend)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = backend
        self._init_lora(adapter_name, r, alpha, dropout, **adapter_options)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r=8, alpha=16, dropout=0.0, backend=None, *, adapter_name=DEFAULT_ADAPTER,
        **adapter_options,
    ) -> LoRALinear:  # fmt: skip
        """Wrap `linear`, sharing its weight and bias Parameters (no copy). adapter_options: use_rslora,
        init_lora_weights (see LoRALayer.add_adapter)."""
        _check_base(f"{cls.__name__}.from_linear", linear, "torch.nn.Linear", isinstance(linear, nn.Linear))
        module = cls(
            linear.in_features, linear.out_features, r, alpha, dropout,
            bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype, backend=backend,
            adapter_name=adapter_name,
        )  # fmt: skip
        module.weight, module.bias = linear.weight, linear.bias
        module._rebuild_adapter(adapter_name, r, alpha, dropout, adapter_options)
        return module

    def _adapter_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear_forward(x, self.weight)


class LoRAConv1D(LoRALayer, nn.Module):
    """transformers' GPT-2 `Conv1D(nf, nx)` with LoRA adapters: same `weight` [nx, nf] (= [in, out])
    and `bias` [nf] keys, plus lora_A [r, nx] and lora_B [nf, r] each (PEFT's fan_in_fan_out layout).

    It mirrors Conv1D rather than subclassing it, so lowrank does not depend on transformers.
    """

    supports_pissa = supports_dora = True

    def __init__(
        self, nf, nx, r=8, alpha=16, dropout=0.0, device=None, dtype=None, backend=None,
        *, adapter_name=DEFAULT_ADAPTER, **adapter_options,
    ):  # fmt: skip
        _backends.check_name(type(self).__name__, backend)
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)  # as transformers' Conv1D
        self.backend = backend
        self._init_lora(adapter_name, r, alpha, dropout, **adapter_options)

    @classmethod
    def from_conv1d(
        cls, conv1d: nn.Module, r=8, alpha=16, dropout=0.0, backend=None, *, adapter_name=DEFAULT_ADAPTER,
        **adapter_options,
    ) -> LoRAConv1D:  # fmt: skip
        """Wrap a transformers Conv1D, sharing its weight and bias Parameters (no copy)."""
        _check_base(f"{cls.__name__}.from_conv1d", conv1d, "transformers Conv1D", is_hf_conv1d(conv1d))
        module = cls(
            conv1d.nf, conv1d.nx, r, alpha, dropout, device="meta", dtype=conv1d.weight.dtype, backend=backend,
            adapter_name=adapter_name,
        )  # fmt: skip
        module.weight, module.bias = conv1d.weight, conv1d.bias
        module._rebuild_adapter(adapter_name, r, alpha, dropout, adapter_options)
        return module

    def _adapter_shapes(self, r):
        return (r, self.nx), (self.nf, r)

    def _weight_out_in(self) -> torch.Tensor:
        return self.weight.t()

    def _delta_layout(self, product: torch.Tensor) -> torch.Tensor:
        return product.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight.t() is a transposed view of the [in, out] storage, not a copy.
        return self._linear_forward(x, self.weight.t())

    def _base_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """nn.Embedding with LoRA adapters (PEFT semantics):
    lora_A [r, num_embeddings], lora_B [embedding_dim, r], out = emb(x) + scaling · A.T[x] · B.T.

    There is no dropout: a lookup has no input features to drop (PEFT ignores lora_dropout here too).
    """

    feature_dims = 0

    def __init__(
        self, num_embeddings, embedding_dim, r=8, alpha=16, padding_idx=None, max_norm=None, norm_type=2.0,
        scale_grad_by_freq=False, sparse=False, device=None, dtype=None, *, adapter_name=DEFAULT_ADAPTER,
        **adapter_options,
    ):  # fmt: skip
        super().__init__(
            num_embeddings, embedding_dim, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, device=device, dtype=dtype,
        )  # fmt: skip
        self._init_lora(adapter_name, r, alpha, 0.0, **adapter_options)

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, r=8, alpha=16, *, adapter_name=DEFAULT_ADAPTER, **adapter_options
    ) -> LoRAEmbedding:
        """Wrap `embedding`, sharing its weight Parameter (no copy; weight tying survives)."""
        _check_base(
            f"{cls.__name__}.from_embedding", embedding, "torch.nn.Embedding", isinstance(embedding, nn.Embedding)
        )
        module = cls(
            embedding.num_embeddings, embedding.embedding_dim, r, alpha, padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm, norm_type=embedding.norm_type, scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse, device="meta", dtype=embedding.weight.dtype, adapter_name=adapter_name,
        )  # fmt: skip
        module.weight = embedding.weight
        module._rebuild_adapter(adapter_name, r, alpha, 0.0, adapter_options)
        return module

    def add_adapter(self, adapter_name, r, alpha, dropout=0.0, **options) -> None:
        super().add_adapter(adapter_name, r, alpha, 0.0, **options)  # a lookup has no dropout

    def _adapter_shapes(self, r):
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def reset_lora_parameters(self, adapter_name: str) -> None:
        lora_A, lora_B = self.lora_parameters(adapter_name)
        nn.init.zeros_(lora_A)
        nn.init.normal_(lora_B)

    def _delta_layout(self, product: torch.Tensor) -> torch.Tensor:
        return product.t()

    def _low_rank_term(self, x, lora_A, lora_B, scaling, dropout) -> torch.Tensor:
        # padding_idx / scale_grad_by_freq shape the gradient of A the way they shape the base's.
        after_A = F.embedding(x, lora_A.t(), self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        return scaling * (after_A @ lora_B.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_each_term(super().forward(x), x)


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """nn.Conv2d with LoRA adapters in PEFT's layout: lora_A [r, in_channels, kh, kw] applied with the
    base conv's stride, padding, dilation and padding_mode; lora_B [out_channels, r, 1, 1] a 1x1 conv.

    Only groups=1: a grouped base weight cannot absorb the dense B·A update, so merging would be
    impossible (PEFT refuses to merge those too).
    """

    feature_dims = 3

    def __init__(
        self, in_channels, out_channels, kernel_size, r=8, alpha=16, dropout=0.0, stride=1, padding=0, dilation=1,
        groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *, adapter_name=DEFAULT_ADAPTER,
        **adapter_options,
    ):  # fmt: skip
        if groups != 1:
            raise ValueError(f"{type(self).__name__}: only groups=1 convolutions are supported, got groups={groups}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        self._init_lora(adapter_name, r, alpha, dropout, **adapter_options)

    @classmethod
    def from_conv2d(
        cls, conv: nn.Conv2d, r=8, alpha=16, dropout=0.0, *, adapter_name=DEFAULT_ADAPTER, **adapter_options
    ) -> LoRAConv2d:
        """Wrap `conv`, sharing its weight and bias Parameters (no copy)."""
        _check_base(f"{cls.__name__}.from_conv2d", conv, "torch.nn.Conv2d", isinstance(conv, nn.Conv2d))
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, r, alpha, dropout, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device="meta", dtype=conv.weight.dtype, adapter_name=adapter_name,
        )  # fmt: skip
        module.weight, module.bias = conv.weight, conv.bias
        module._rebuild_adapter(adapter_name, r, alpha, dropout, adapter_options)
        return module

    def _adapter_shapes(self, r):
        return (r, self.in_channels, *self.kernel_size), (self.out_channels, r, 1, 1)

    def _product(self, lora_B: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype()
        return (lora_B.to(dtype).flatten(1) @ lora_A.to(dtype).flatten(1)).view(self.weight.shape)

    def _low_rank_term(self, x, lora_A, lora_B, scaling, dropout) -> torch.Tensor:
        # _conv_forward applies this layer's stride/padding/dilation/padding_mode to the A kernel.
        return scaling * F.conv2d(self._conv_forward(F.dropout(x, dropout, self.training), lora_A, None), lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_each_term(super().forward(x), x)
