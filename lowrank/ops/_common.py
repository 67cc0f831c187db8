"""Pieces every op's Python wrapper shares."""

from __future__ import annotations

import torch


def autocast_inputs(*tensors):
    """Under torch.autocast, cast the op's tensors to the autocast dtype, as nn.Linear's matmuls
    would be; otherwise return them unchanged. Anything else (None, or a wrong argument that the
    op's checks then name) passes through."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or not (torch.amp.is_autocast_available(first.device.type)
                             and torch.is_autocast_enabled(first.device.type)):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in tensors)
