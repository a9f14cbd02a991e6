"""Quantization math (DESIGN.md section 2) in NumPy, with thin torch wrappers for the simulation and LKD.

One implementation serves both paths: `finequant quantize` works without torch (NumPy arrays in, NumPy
arrays out), and a torch tensor passed in is converted, quantized by the same code and handed back as
torch tensors on its device. These ops are the Python reference the C++ quantizer (finequant._core)
and the inference engine are compared against, so every step mirrors the C++: fp32, round half to
even, division by the broadcast scale (not multiplication by its reciprocal), all-zero tiles get
scale 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np


@dataclass
class QTensor:
    """Quantized tensor: integers q (I8 symmetric / U8 asymmetric, unpacked) and per-tile scales.

    For weights q is [R, C] and scale/zero_point [R / rows, ceil(C / cols)]. For token-wise
    activations q keeps the input shape [..., K] and scale/zero_point are [..., 1]. The arrays are
    NumPy arrays, or torch tensors when the input was a torch tensor.
    """

    q: Any
    scale: Any
    zero_point: Optional[Any]
    bits: int
    symmetric: bool
    tile: Tuple[int, int]


def is_torch(x) -> bool:
    """A torch tensor (checked without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_torch(a: np.ndarray, like):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)


def _torch_qtensor(qt: QTensor, like) -> QTensor:
    z = None if qt.zero_point is None else _to_torch(qt.zero_point, like)
    return QTensor(q=_to_torch(qt.q, like), scale=_to_torch(qt.scale, like), zero_point=z, bits=qt.bits,
                   symmetric=qt.symmetric, tile=qt.tile)


def quant_max(bits: int, symmetric: bool) -> int:
    return (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1


def _check_input(x, bits: int) -> np.ndarray:
    """x (NumPy array, torch tensor or nested lists) as a finite fp32 NumPy array."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if is_torch(x):
        if not x.is_floating_point():
            raise ValueError(f"quantize needs a floating-point tensor, got {x.dtype}")
        import torch

        x = x.detach().to(torch.float32).cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"quantize needs a floating-point tensor, got {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        kind = "NaN" if np.isnan(x).any() else "Inf"
        raise ValueError(f"cannot quantize a tensor containing {kind} values")
    return x


def _tiles(x, rows: int, cols: int):
    """View x [R, C] (NumPy or torch) as [R/rows, rows, nb, cols], zero-padding the last partial
    column block. Zero padding cannot change the result: the quantization range always includes zero."""
    r, c = x.shape
    nb = -(-c // cols)
    if nb * cols != c:
        if isinstance(x, np.ndarray):
            x = np.pad(x, ((0, 0), (0, nb * cols - c)))
        else:
            import torch.nn.functional as F

            x = F.pad(x, (0, nb * cols - c))
    return x.reshape(r // rows, rows, nb, cols)


def _expand(s, rows: int, cols: int, c: int):
    """Per-tile values [R/rows, nb] (NumPy or torch) -> per-element [R, C]."""
    if isinstance(s, np.ndarray):
        return np.repeat(np.repeat(s, rows, axis=0), cols, axis=1)[:, :c]
    return s.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)[:, :c]


def round_scale_to_half(s):
    """scale_dtype "fp16" (DESIGN.md section 2): each scale rounded to the nearest IEEE half (round to
    nearest even, as the C++ does), 2^-24 where that is 0; a scale beyond the half range (65504) is
    an error. NumPy or torch in, the same kind out."""
    if is_torch(s):
        return _to_torch(round_scale_to_half(s.detach().cpu().numpy()), s)
    s = np.asarray(s, dtype=np.float32)
    with np.errstate(over="ignore"):
        h = s.astype(np.float16)
    if np.isinf(h).any():
        raise ValueError(f"a weight scale ({s.max():.6g}) is beyond the fp16 range (65504): "
                         "use scale_dtype fp32")
    r = h.astype(np.float32)
    return np.where(r == 0, np.float32(2.0 ** -24), r).astype(np.float32)


def quantize_tensor(x, bits: int, symmetric: bool, tile, half_scales: bool = False) -> QTensor:
    """Quantize a 2-D tensor [R, C] with one scale (and zero point) per (rows, cols) tile;
    half_scales: the scales rounded to fp16 values first (round_scale_to_half).
    A torch tensor in gives torch tensors out (same device); anything else gives NumPy arrays."""
    if is_torch(x):
        return _torch_qtensor(quantize_tensor(_check_input(x, bits), bits, symmetric, tile, half_scales), x)
    x = _check_input(x, bits)
    if x.ndim != 2:
        raise ValueError(f"quantize_tensor needs a 2-D tensor, got shape {tuple(x.shape)}")
    r, c = x.shape
    if r == 0 or c == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}")
    rows, cols = int(tile[0]), int(tile[1])
    if rows < 1 or r % rows:
        raise ValueError(f"tile rows: group of {rows} rows does not divide the {r} rows")
    if not 1 <= cols <= c:
        raise ValueError(f"tile cols {cols} must be in [1, {c}]")
    t = _tiles(x, rows, cols)
    qmax = quant_max(bits, symmetric)
    f32 = np.float32
    if symmetric:
        s = np.abs(t).max(axis=(1, 3)) / f32(qmax)
        s[s == 0] = 1.0
        if half_scales:
            s = round_scale_to_half(s)
        q = np.clip(np.rint(x / _expand(s, rows, cols, c)), -qmax, qmax).astype(np.int8)
        z = None
    else:
        lo = np.minimum(t.min(axis=(1, 3)), f32(0))
        hi = np.maximum(t.max(axis=(1, 3)), f32(0))
        with np.errstate(over="ignore"):
            span = hi - lo
        if not np.isfinite(span).all():
            raise ValueError("value range overflows float32")
        s = span / f32(qmax)
        s[s == 0] = 1.0
        if half_scales:
            s = round_scale_to_half(s)
        zf = np.clip(np.rint(-lo / s), 0, qmax).astype(np.float32)
        qf = np.rint(x / _expand(s, rows, cols, c)) + _expand(zf, rows, cols, c)
        q = np.clip(qf, 0, qmax).astype(np.uint8)
        z = zf.astype(np.uint8)
    return QTensor(q=np.ascontiguousarray(q), scale=np.ascontiguousarray(s, dtype=np.float32), zero_point=z,
                   bits=bits, symmetric=symmetric, tile=(rows, cols))


def dequantize(qt: QTensor):
    """scale * (q - zero_point) as fp32, in the shape of qt.q (torch when qt holds torch tensors)."""
    if is_torch(qt.q):
        z = None if qt.zero_point is None else qt.zero_point.cpu().numpy()
        host = QTensor(q=qt.q.cpu().numpy(), scale=qt.scale.cpu().numpy(), zero_point=z, bits=qt.bits,
                       symmetric=qt.symmetric, tile=qt.tile)
        return _to_torch(dequantize(host), qt.q)
    shape = qt.q.shape
    q = qt.q.reshape(-1, shape[-1]) if qt.q.ndim != 2 else qt.q
    c = q.shape[1]
    s = qt.scale.reshape(-1, qt.scale.shape[-1])
    rows, cols = qt.tile
    if qt.q.ndim != 2:  # token-wise activations: one scale per row
        rows, cols = 1, c
    qf = q.astype(np.float32)
    if qt.zero_point is not None:
        z = qt.zero_point.reshape(s.shape).astype(np.float32)
        qf = qf - _expand(z, rows, cols, c)
    return (qf * _expand(s, rows, cols, c)).reshape(shape)


def quantize_activations(x, bits: int, symmetric: bool) -> QTensor:
    """Token-wise dynamic quantization: one scale per row of the last dimension, any leading dims."""
    if is_torch(x):
        return _torch_qtensor(quantize_activations(_check_input(x, bits), bits, symmetric), x)
    x = _check_input(x, bits)
    if x.ndim == 0:
        raise ValueError("cannot quantize a scalar as activations")
    k = x.shape[-1]
    qt = quantize_tensor(x.reshape(-1, k), bits, symmetric, (1, k))
    lead = tuple(x.shape[:-1])
    return QTensor(q=qt.q.reshape(x.shape), scale=qt.scale.reshape(lead + (1,)),
                   zero_point=None if qt.zero_point is None else qt.zero_point.reshape(lead + (1,)),
                   bits=bits, symmetric=symmetric, tile=(1, k))


def fake_quant_weight(w, bits: int, symmetric: bool, tile, half_scales: bool = False):
    return dequantize(quantize_tensor(w, bits, symmetric, tile, half_scales))


def fake_quant_activation(x, bits: int, symmetric: bool):
    return dequantize(quantize_activations(x, bits, symmetric))


def relative_error(w, w_hat) -> float:
    """||w - w_hat||_F / ||w||_F (0 for an all-zero w reproduced exactly)."""
    w = (w.detach().cpu().numpy() if is_torch(w) else np.asarray(w)).astype(np.float64)  # fp32 norms overflow
    w_hat = (w_hat.detach().cpu().numpy() if is_torch(w_hat) else np.asarray(w_hat)).astype(np.float64)
    num = float(np.linalg.norm(w - w_hat))
    den = float(np.linalg.norm(w))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def __getattr__(name: str):
    # QuantLinear is a torch module (finequant.simulate); importing it here keeps this module torch-free.
    if name == "QuantLinear":
        from .simulate import QuantLinear

        return QuantLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
