"""Fake-quantization in torch, following the math contract (DESIGN.md section 2) bit for bit.

These ops are the Python reference the C++ quantizer (finequant._core) and the inference engine are
compared against, so every step mirrors the C++: fp32, round half to even, division by the broadcast
scale (not multiplication by its reciprocal), all-zero tiles get scale 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from .rotate import hadamard_blocks, rotate_weight
from .schemes import LinearQuant


@dataclass
class QTensor:
    """Quantized tensor: integers q (I8 symmetric / U8 asymmetric, unpacked) and per-tile scales.

    For weights q is [R, C] and scale/zero_point [R / rows, ceil(C / cols)]. For token-wise
    activations q keeps the input shape [..., K] and scale/zero_point are [..., 1].
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    bits: int
    symmetric: bool
    tile: Tuple[int, int]


def quant_max(bits: int, symmetric: bool) -> int:
    return (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1


def _check_input(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got {x.dtype}")
    x = x.detach().to(torch.float32)
    if not torch.isfinite(x).all():
        kind = "NaN" if torch.isnan(x).any() else "Inf"
        raise ValueError(f"cannot quantize a tensor containing {kind} values")
    return x


def _tiles(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """View x [R, C] as [R/rows, rows, nb, cols], zero-padding the last partial column block.

    Zero padding cannot change the result: the quantization range always includes zero.
    """
    r, c = x.shape
    nb = -(-c // cols)
    if nb * cols != c:
        x = F.pad(x, (0, nb * cols - c))
    return x.reshape(r // rows, rows, nb, cols)


def _expand(s: torch.Tensor, rows: int, cols: int, c: int) -> torch.Tensor:
    """Per-tile values [R/rows, nb] -> per-element [R, C]."""
    return s.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)[:, :c]


def round_scale_to_half(s: torch.Tensor) -> torch.Tensor:
    """scale_dtype "fp16" (DESIGN.md section 2): each scale rounded to the nearest IEEE half, 2^-24
    where that is 0; a scale beyond the half range (65504) is an error."""
    h = s.to(torch.float16)
    if torch.isinf(h).any():
        raise ValueError(f"a weight scale ({s.max().item():.6g}) is beyond the fp16 range (65504): "
                         "use scale_dtype fp32")
    r = h.to(torch.float32)
    return torch.where(r == 0, torch.full_like(r, 2.0 ** -24), r)


def quantize_tensor(x: torch.Tensor, bits: int, symmetric: bool, tile, half_scales: bool = False) -> QTensor:
    """Quantize a 2-D tensor [R, C] with one scale (and zero point) per (rows, cols) tile;
    half_scales: the scales rounded to fp16 values first (round_scale_to_half)."""
    x = _check_input(x, bits)
    if x.dim() != 2:
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
    if symmetric:
        s = t.abs().amax(dim=(1, 3)) / qmax
        s[s == 0] = 1.0
        if half_scales:
            s = round_scale_to_half(s)
        q = torch.clamp(torch.round(x / _expand(s, rows, cols, c)), -qmax, qmax).to(torch.int8)
        z = None
    else:
        lo = torch.clamp(t.amin(dim=(1, 3)), max=0.0)
        hi = torch.clamp(t.amax(dim=(1, 3)), min=0.0)
        span = hi - lo
        if not torch.isfinite(span).all():
            raise ValueError("value range overflows float32")
        s = span / qmax
        s[s == 0] = 1.0
        if half_scales:
            s = round_scale_to_half(s)
        zf = torch.clamp(torch.round(-lo / s), 0, qmax)
        qf = torch.round(x / _expand(s, rows, cols, c)) + _expand(zf, rows, cols, c)
        q = torch.clamp(qf, 0, qmax).to(torch.uint8)
        z = zf.to(torch.uint8)
    return QTensor(q=q, scale=s.contiguous(), zero_point=z, bits=bits, symmetric=symmetric,
                   tile=(rows, cols))


def dequantize(qt: QTensor) -> torch.Tensor:
    """scale * (q - zero_point) as fp32, in the shape of qt.q."""
    shape = qt.q.shape
    q = qt.q.reshape(-1, shape[-1]) if qt.q.dim() != 2 else qt.q
    c = q.shape[1]
    s = qt.scale.reshape(-1, qt.scale.shape[-1])
    rows, cols = qt.tile
    if qt.q.dim() != 2:  # token-wise activations: one scale per row
        rows, cols = 1, c
    qf = q.to(torch.float32)
    if qt.zero_point is not None:
        z = qt.zero_point.reshape(s.shape).to(torch.float32)
        qf = qf - _expand(z, rows, cols, c)
    return (qf * _expand(s, rows, cols, c)).reshape(shape)


def quantize_activations(x: torch.Tensor, bits: int, symmetric: bool) -> QTensor:
    """Token-wise dynamic quantization: one scale per row of the last dimension, any leading dims."""
    x = _check_input(x, bits)
    if x.dim() == 0:
        raise ValueError("cannot quantize a scalar as activations")
    k = x.shape[-1]
    qt = quantize_tensor(x.reshape(-1, k), bits, symmetric, (1, k))
    lead = tuple(x.shape[:-1])
    return QTensor(q=qt.q.reshape(x.shape), scale=qt.scale.reshape(lead + (1,)),
                   zero_point=None if qt.zero_point is None else qt.zero_point.reshape(lead + (1,)),
                   bits=bits, symmetric=symmetric, tile=(1, k))


def fake_quant_weight(w: torch.Tensor, bits: int, symmetric: bool, tile, half_scales: bool = False) -> torch.Tensor:
    return dequantize(quantize_tensor(w, bits, symmetric, tile, half_scales))


def fake_quant_activation(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    return dequantize(quantize_activations(x, bits, symmetric))


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||w - w_hat||_F / ||w||_F (0 for an all-zero w reproduced exactly)."""
    w = w.to(torch.float64)  # fp32 norms overflow for |w| ~ 1e20
    num = torch.linalg.vector_norm(w - w_hat.to(torch.float64)).item()
    den = torch.linalg.vector_norm(w).item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


class QuantLinear(nn.Module):
    """Simulated quantized Linear: weight fake-quantized once, input rows fake-quantized per call.

    This is the fp32 reference of what the integer engine computes; results agree up to fp32
    accumulation order.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearQuant):
        super().__init__()
        weight = weight.detach().to(torch.float32)
        if spec.rotation:
            weight = rotate_weight(weight, spec.rotation)
        if spec.weight_bits:
            weight = fake_quant_weight(weight, spec.weight_bits, spec.weight_symmetric, spec.tile, spec.half_scales)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        self.spec = spec

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearQuant) -> "QuantLinear":
        return cls(linear.weight, linear.bias, spec)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.spec.rotation:
            x = hadamard_blocks(x, self.spec.rotation)
        if self.spec.act_bits:
            x = fake_quant_activation(x, self.spec.act_bits, self.spec.act_symmetric)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in={self.in_features}, out={self.out_features}, w{s.weight_bits or 32}"
                f"{'' if s.weight_symmetric else ' asym'} tile={s.tile}, a{s.act_bits or 32}"
                f"{'' if s.act_symmetric else ' asym'}{f' rotate={s.rotation}' if s.rotation else ''}")
