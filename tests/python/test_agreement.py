"""The torch fake-quant reference and the C++ reference (finequant._core) agree bit for bit."""
import math

import numpy as np
import pytest
import torch

from finequant import _core
from finequant.pack import pack_int4, unpack_int4
from finequant.quantize import dequantize, quantize_activations, quantize_tensor

CONFIGS = [(8, True), (8, False), (4, True), (4, False)]


def _np(a):
    return None if a is None else np.asarray(a)


def _same(a, b):
    """Bit-exact equality (NaN-free inputs; -0.0 == 0.0 is fine for our outputs)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert np.array_equal(a, b), np.argwhere(a != b)[:5]


def _inputs(seed):
    """Awkward matrices: shapes with ragged K, M=1, all-zero rows, extreme magnitudes, constants."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for (r, c) in [(1, 1), (1, 37), (4, 64), (6, 100), (16, 33), (12, 576), (3, 130)]:
        x = torch.randn(r, c, generator=g)
        out.append(x)
        out.append(x * 1e30)
        out.append(x * 1e-30)
        out.append(torch.rand(r, c, generator=g) + 0.25)  # all positive: zero point 0
        out.append(-torch.rand(r, c, generator=g))        # all negative
        y = x.clone()
        y[0] = 0  # an all-zero row
        out.append(y)
        # exact half-way values (x / s lands on .5): round half to even must agree
        out.append(torch.randint(-254, 255, (r, c), generator=g).float() / 2)
    out.append(torch.zeros(4, 8))
    return out


def _tiles(r, c):
    tiles = {(1, c), (r, c)}
    for g in (2, 3, 4):
        if r % g == 0:
            tiles.add((r // g, c))
    for kb in (1, 7, 32, 64, 128):
        if kb <= c:
            tiles.add((1, kb))
            if r % 2 == 0:
                tiles.add((2, kb))
    return sorted(tiles)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,symmetric", CONFIGS)
def test_weights_bit_exact(seed, bits, symmetric):
    for x in _inputs(seed):
        r, c = x.shape
        for rows, cols in _tiles(r, c):
            ref = quantize_tensor(x, bits, symmetric, (rows, cols))
            q, s, z = _core.quantize(x.numpy(), bits, symmetric, rows, cols)
            _same(q, ref.q.numpy())
            _same(s, ref.scale.numpy())
            assert np.asarray(s).shape == (r // rows, math.ceil(c / cols))
            if symmetric:
                assert z is None
            else:
                _same(z, ref.zero_point.numpy())
            d = _core.dequantize(q, s, z, bits, symmetric, rows, cols)
            _same(d, dequantize(ref).numpy())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits,symmetric", CONFIGS)
def test_activations_bit_exact(seed, bits, symmetric):
    for x in _inputs(seed):
        ref = quantize_activations(x, bits, symmetric)
        q, s, z = _core.quantize_rows(x.numpy(), bits, symmetric)
        _same(q, ref.q.numpy())
        _same(np.asarray(s).reshape(-1), ref.scale.numpy().reshape(-1))
        if symmetric:
            assert z is None
        else:
            _same(np.asarray(z).reshape(-1), ref.zero_point.numpy().reshape(-1))
        d = _core.dequantize(q, np.asarray(s).reshape(-1, 1),
                             None if z is None else np.asarray(z).reshape(-1, 1),
                             bits, symmetric, 1, x.shape[1])
        _same(d, dequantize(ref).numpy())


@pytest.mark.parametrize("is_signed", [True, False])
def test_pack_int4_agrees(is_signed):
    rng = np.random.default_rng(7)
    for shape in [(1, 2), (3, 64), (5, 130)]:
        if is_signed:
            q = rng.integers(-8, 8, size=shape).astype(np.int8)
        else:
            q = rng.integers(0, 16, size=shape).astype(np.uint8)
        p = _core.pack_int4(q)
        _same(p, pack_int4(q))
        _same(_core.unpack_int4(p, is_signed), unpack_int4(p, is_signed))
        _same(_core.unpack_int4(p, is_signed), q)


def test_quantized_weights_pack_agree():
    x = torch.randn(8, 96)
    for sym in (True, False):
        ref = quantize_tensor(x, 4, sym, (1, 32))
        q, _, _ = _core.quantize(x.numpy(), 4, sym, 1, 32)
        _same(_core.pack_int4(q), pack_int4(ref.q))


def test_both_raise_the_same_errors():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[2, 3] = bad
        for sym in (True, False):
            with pytest.raises(ValueError):
                quantize_tensor(torch.from_numpy(y), 8, sym, (1, 8))
            with pytest.raises(ValueError):
                _core.quantize(y, 8, sym, 1, 8)
            with pytest.raises(ValueError):
                quantize_activations(torch.from_numpy(y), 8, sym)
            with pytest.raises(ValueError):
                _core.quantize_rows(y, 8, sym)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_tensor(torch.from_numpy(x), 8, True, (3, 8))
    with pytest.raises(ValueError):
        _core.quantize(x, 8, True, 3, 8)
    for bits in (2, 16):
        with pytest.raises(ValueError):
            quantize_tensor(torch.from_numpy(x), bits, True, (1, 8))
        with pytest.raises(ValueError):
            _core.quantize(x, bits, True, 1, 8)
    over = np.array([[-3e38, 3e38]], np.float32)
    with pytest.raises(ValueError, match="overflows"):
        quantize_tensor(torch.from_numpy(over), 8, False, (1, 2))
    with pytest.raises(ValueError):
        _core.quantize(over, 8, False, 1, 2)
    odd = np.zeros((2, 3), np.int8)
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(odd)
    with pytest.raises(ValueError):
        _core.pack_int4(odd)
