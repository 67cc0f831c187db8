"""Pieces every op's Python wrapper shares."""

from __future__ import annotations

import torch


def autocast_inputs(*tensors):
    """Under torch.autocast, cast the op's tensors (None passes through) to the autocast dtype,
    as nn.Linear's matmuls would be; otherwise return them unchanged."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None else t.to(dtype) for t in tensors)
