"""INT4 packing along the last dimension (DESIGN.md section 2).

Element 2i goes to the low nibble of byte i, element 2i+1 to the high nibble; signed values are
two's complement nibbles.
"""
from __future__ import annotations

import numpy as np


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def pack_int4(q) -> np.ndarray:
    """int8 in [-8, 7] or uint8 in [0, 15], shape [..., C] with C even -> uint8 [..., C / 2]."""
    q = _as_numpy(q)
    if q.dtype == np.int8:
        lo, hi = -8, 7
    elif q.dtype == np.uint8:
        lo, hi = 0, 15
    else:
        raise ValueError(f"INT4 packing needs int8 or uint8 values, got {q.dtype}")
    if q.ndim == 0:
        raise ValueError("INT4 packing needs at least one dimension")
    if q.shape[-1] % 2:
        raise ValueError("INT4 packing needs an even number of columns")
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"INT4 values must be in [{lo}, {hi}], got [{q.min()}, {q.max()}]")
    u = q.view(np.uint8) & 0x0F  # two's complement nibble for the signed case
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8, copy=False)


def unpack_int4(packed, is_signed: bool) -> np.ndarray:
    """uint8 [..., C / 2] -> int8 [..., C] (is_signed) or uint8 [..., C]."""
    p = _as_numpy(packed)
    if p.dtype != np.uint8:
        raise ValueError(f"packed INT4 data must be uint8, got {p.dtype}")
    if p.ndim == 0:
        raise ValueError("packed INT4 data needs at least one dimension")
    out = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[:-1] + (p.shape[-1] * 2,))
    if is_signed:
        return ((out.astype(np.int8) ^ 8) - 8).astype(np.int8)  # sign-extend the nibble
    return out
