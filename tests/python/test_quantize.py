"""The torch fake-quant ops against hand-computed cases and a naive per-tile reference."""
import math

import numpy as np
import pytest
import torch

from finequant.pack import pack_int4, unpack_int4
from finequant.quantize import (QuantLinear, dequantize, fake_quant_activation, fake_quant_weight,
                                quantize_activations, quantize_tensor)
from finequant.schemes import LinearQuant


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def naive(x, bits, symmetric, tile):
    """Tile-by-tile loop, straight from DESIGN.md section 2 (slow, obviously right)."""
    r, c = x.shape
    rows, cols = tile
    nb = math.ceil(c / cols)
    s = torch.empty(r // rows, nb)
    z = torch.zeros(r // rows, nb)
    q = torch.empty(r, c)
    for i in range(r // rows):
        for j in range(nb):
            blk = x[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                sc = blk.abs().max() / qmax
                sc = torch.where(sc == 0, torch.ones(()), sc)
                q[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = torch.clamp(
                    torch.round(blk / sc), -qmax, qmax)
            else:
                qmax = 2 ** bits - 1
                lo, hi = torch.clamp(blk.min(), max=0), torch.clamp(blk.max(), min=0)
                sc = (hi - lo) / qmax
                sc = torch.where(sc == 0, torch.ones(()), sc)
                zp = torch.clamp(torch.round(-lo / sc), 0, qmax)
                z[i, j] = zp
                q[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = torch.clamp(
                    torch.round(blk / sc) + zp, 0, qmax)
            s[i, j] = sc
    return q, s, z


def test_symmetric_int8_by_hand():
    qt = quantize_tensor(t([[1.5, 2.5, -2.5, 127.0, 0.5]]), 8, True, (1, 5))
    assert qt.q.dtype == torch.int8 and qt.zero_point is None
    assert qt.scale.tolist() == [[1.0]]
    assert qt.q.tolist() == [[2, 2, -2, 127, 0]]  # round half to even


def test_symmetric_int4_clamps_and_scales():
    qt = quantize_tensor(t([[-7.0, 3.5, 1.0], [0.7, 0.0, -0.35]]), 4, True, (1, 3))
    assert torch.equal(qt.scale, t([[1.0], [0.1]]))
    assert qt.q[0].tolist() == [-7, 4, 1]
    assert qt.q[1].tolist() == [7, 0, -4]  # -0.35 / 0.1 = -3.4999... or -3.5 -> even; check by torch
    assert qt.q[1, 2].item() == torch.round(t(-0.35) / t(0.1)).item()


def test_asymmetric_by_hand():
    qt = quantize_tensor(t([[0.0, 1.0, 2.0, 3.0]]), 8, False, (1, 4))
    assert qt.q.dtype == torch.uint8 and qt.zero_point.dtype == torch.uint8
    assert qt.zero_point.tolist() == [[0]]
    assert qt.q.tolist() == [[0, 85, 170, 255]]
    qt = quantize_tensor(t([[-1.0, 0.0, 1.0, 2.0, 3.0]]), 4, False, (1, 5))
    s = 4.0 / 15
    assert qt.scale.item() == pytest.approx(s)
    assert qt.zero_point.tolist() == [[4]]  # round(3.75)
    assert qt.q[0, 0].item() == 0 and qt.q[0, -1].item() == 15
    assert dequantize(qt)[0, 1].item() == 0.0  # zero is exactly representable


def test_range_includes_zero():
    qt = quantize_tensor(t([[2.0, 4.0]]), 8, False, (1, 2))
    assert qt.zero_point.item() == 0 and qt.scale.item() == pytest.approx(4 / 255)
    qt = quantize_tensor(t([[-2.0, -4.0]]), 8, False, (1, 2))
    assert qt.zero_point.item() == 255 and qt.q.tolist() == [[128, 0]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_tile_scale_one(symmetric):
    x = torch.zeros(2, 6)
    x[1] = torch.arange(6.0)
    qt = quantize_tensor(x, 8, symmetric, (1, 6))
    assert qt.scale[0].item() == 1.0
    assert torch.equal(dequantize(qt)[0], torch.zeros(6))
    assert torch.isfinite(dequantize(qt)).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,tile", [((6, 10), (1, 10)), ((6, 10), (1, 4)), ((6, 10), (3, 10)),
                                        ((6, 10), (6, 10)), ((6, 10), (2, 3)), ((1, 7), (1, 1))])
def test_matches_naive_reference(bits, symmetric, shape, tile):
    g = torch.Generator().manual_seed(hash((bits, symmetric, shape, tile)) % 1000)
    x = torch.randn(shape, generator=g) * 3 + (0.5 if not symmetric else 0)
    qt = quantize_tensor(x, bits, symmetric, tile)
    q, s, z = naive(x, bits, symmetric, tile)
    assert qt.scale.shape == (shape[0] // tile[0], math.ceil(shape[1] / tile[1]))
    assert torch.equal(qt.q.float(), q)
    assert torch.equal(qt.scale, s)
    if not symmetric:
        assert torch.equal(qt.zero_point.float(), z)
    # round-trip error: half a step when symmetric, at most one step with the zero point
    step = s.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:, :shape[1]]
    err = (dequantize(qt) - x).abs()
    assert (err <= step * (0.5 if symmetric else 1.0) * (1 + 1e-5)).all()


def test_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits"):
        quantize_tensor(x, 2, True, (1, 8))
    with pytest.raises(ValueError, match="does not divide"):
        quantize_tensor(x, 8, True, (3, 8))
    with pytest.raises(ValueError, match="cols"):
        quantize_tensor(x, 8, True, (1, 9))
    with pytest.raises(ValueError, match="2-D"):
        quantize_tensor(torch.randn(8), 8, True, (1, 8))
    for bad, word in ((float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "Inf")):
        y = x.clone()
        y[1, 2] = bad
        with pytest.raises(ValueError, match=word):
            quantize_tensor(y, 8, True, (1, 8))
        with pytest.raises(ValueError, match=word):
            quantize_activations(y, 8, False)
    with pytest.raises(ValueError, match="overflows float32"):
        quantize_tensor(t([[-3e38, 3e38]]), 8, False, (1, 2))
    # symmetric has no range subtraction, so the same values are fine
    assert quantize_tensor(t([[-3e38, 3e38]]), 8, True, (1, 2)).q.tolist() == [[-127, 127]]


def test_extreme_magnitudes():
    for mag in (1e30, 1e-30):
        x = torch.randn(3, 16) * mag
        for sym in (True, False):
            qt = quantize_tensor(x, 8, sym, (1, 16))
            rel = (dequantize(qt) - x).double().norm() / x.double().norm()  # fp32 norm overflows
            assert rel < 0.02


def test_activations_tokenwise_any_leading_dims():
    x = torch.randn(2, 3, 12)
    qt = quantize_activations(x, 8, True)
    assert qt.q.shape == x.shape and qt.scale.shape == (2, 3, 1)
    flat = quantize_tensor(x.reshape(6, 12), 8, True, (1, 12))
    assert torch.equal(qt.q.reshape(6, 12), flat.q)
    assert torch.equal(qt.scale.reshape(6, 1), flat.scale)
    assert torch.equal(fake_quant_activation(x, 8, True).reshape(6, 12), dequantize(flat))
    qa = quantize_activations(x[0, 0], 4, False)  # 1-D: a single token
    assert qa.scale.shape == (1,)
    assert dequantize(qa).shape == (12,)


def test_quant_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    spec = LinearQuant(part="fc1", weight_bits=4, weight_symmetric=False, tile=(1, 8), act_bits=8,
                       act_symmetric=True)
    ql = QuantLinear.from_linear(lin, spec)
    x = torch.randn(5, 16)
    w = fake_quant_weight(lin.weight, 4, False, (1, 8))
    ref = fake_quant_activation(x, 8, True) @ w.T + lin.bias
    assert torch.allclose(ql(x), ref, atol=1e-6)
    assert (ql(x) - lin(x)).abs().max() < 0.5  # close to the float layer, not identical
    fp = QuantLinear.from_linear(lin, LinearQuant(part="fc1"))
    assert torch.allclose(fp(x), lin(x))


def test_pack_int4_by_hand():
    q = np.array([[1, -1, -8, 7]], dtype=np.int8)
    p = pack_int4(q)
    assert p.dtype == np.uint8 and p.tolist() == [[0xF1, 0x78]]
    assert np.array_equal(unpack_int4(p, True), q)
    u = np.array([[0, 15, 3, 12]], dtype=np.uint8)
    assert pack_int4(u).tolist() == [[0xF0, 0xC3]]
    assert np.array_equal(unpack_int4(pack_int4(u), False), u)


def test_pack_int4_roundtrip_and_errors():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(5, 12)).astype(np.int8)
    assert np.array_equal(unpack_int4(pack_int4(torch.from_numpy(q)), True), q)
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(np.zeros((2, 3), np.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([[8, 0]], np.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(np.array([[16, 0]], np.uint8))
    with pytest.raises(ValueError, match="int8 or uint8"):
        pack_int4(np.zeros((2, 2), np.int32))
