"""Counter-based dropout mask shared by every backend.

A dropout mask drawn from torch's RNG cannot be regenerated inside a kernel, so
it would have to be stored ([M, K] bytes) or recomputed differently per backend.
Instead every backend derives the keep bit of element (row, col) from a 32-bit
hash of (seed, row, col). The torch reference, the C++ CPU loop, the Triton
kernels and the CUDA kernels all compute the same bits, so a backward pass can
rebuild the mask from the seed alone and tests can compare backends exactly.

    mix32(h)   = lowbias32 (Wellons): h ^= h>>16; h *= 0x21f0aaad; h ^= h>>15;
                 h *= 0x735a2d97; h ^= h>>15          (all mod 2**32)
    row_key    = mix32(row ^ mix32(seed))
    bits       = mix32(col ^ row_key)
    keep       = bits >= threshold(p),   threshold(p) = min(floor(p * 2**32), 2**32 - 1)

Kept elements are multiplied by 1 / (1 - p). `seed` is a 0-dim int64 tensor in
[0, 2**31) on the device of the data, so no host sync is needed to read it.
"""

from __future__ import annotations

import torch

MIX_MUL_1 = 0x21F0AAAD
MIX_MUL_2 = 0x735A2D97
_U32 = 0xFFFFFFFF


def threshold(p: float) -> int:
    """uint32 threshold below which an element is dropped."""
    return min(int(p * 4294967296.0), _U32)


def mix32(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (products stay below 2**63)."""
    h = h ^ (h >> 16)
    h = (h * MIX_MUL_1) & _U32
    h = h ^ (h >> 15)
    h = (h * MIX_MUL_2) & _U32
    return h ^ (h >> 15)


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, row_offset: int = 0) -> torch.Tensor:
    """Boolean [rows, cols] keep mask for rows row_offset .. row_offset + rows - 1."""
    device = seed.device
    seed_key = mix32(seed.to(torch.int64) & _U32)
    row = torch.arange(row_offset, row_offset + rows, device=device, dtype=torch.int64)
    row_key = mix32((row & _U32) ^ seed_key)
    col = torch.arange(cols, device=device, dtype=torch.int64)
    bits = mix32(col[None, :] ^ row_key[:, None])
    return bits >= threshold(p)


def apply_mask(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x / (1 - p) where keep, else 0 (also where x is NaN: a dropped element does not depend on x)."""
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


def apply(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of a 2-D tensor with the hash mask (the reference for every backend)."""
    return apply_mask(x, keep_mask(seed, x.shape[0], x.shape[1], p), p)
