"""The CPU kernels as the engine runs them, on every instruction set this machine has (the dispatch
is forced): integer GEMMs must be bit-identical across ISAs (same quantized rows, same int32 sums,
same fp32 epilogue order) and agree with a float computation on the dequantized operands; whole
integer models agree across ISAs to fp32 rounding (attention sums in a different order)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import finequant
from finequant import _core

ISAS = [name for name, _ in _core.cpu_isas()]  # every level, lowest first (kernels/cpu/cpu_isa.cc)


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    _core.set_isa("auto")
    _core.set_threads(0)


def _isa_or_skip(isa):
    _core.set_isa(isa)
    if _core.active_isa() != isa:
        pytest.skip(f"this CPU lacks {isa}")


def _gelu(v, kind):
    from math import erf, sqrt, tanh, pi
    if kind == "gelu":
        return np.vectorize(lambda t: 0.5 * t * (1 + erf(t / sqrt(2))))(v)
    return np.vectorize(lambda t: 0.5 * t * (1 + tanh(sqrt(2 / pi) * (t + 0.044715 * t ** 3))))(v)


# (M, N, K, weight bits, weight sym, K-block, act bits, act sym, activation)
CASES = [
    (1, 37, 70, 8, True, 0, 8, True, "none"),
    (7, 33, 61, 8, False, 0, 8, False, "gelu"),
    (13, 100, 258, 4, True, 32, 8, True, "gelu_tanh"),
    (6, 64, 200, 4, False, 64, 8, False, "none"),
    (130, 65, 96, 4, True, 96, 4, True, "none"),
    (1, 3072, 768, 4, True, 32, 8, True, "none"),   # decode-shaped W4A8
    (9, 50, 129, 8, True, 0, 4, False, "gelu"),      # K odd, A4 asymmetric
    # Decode rows over an odd number of tiles of 64 channels: the last tile runs as two halves of 32
    # on two threads (the second half partly or wholly padding where N is not a multiple of 64).
    (1, 180, 70, 8, False, 0, 8, False, "gelu"),
    (2, 150, 130, 4, False, 32, 8, False, "none"),   # in-kernel column sums; the last half all padding
    (2, 576, 96, 8, True, 32, 8, True, "gelu_tanh"),  # 9 tiles, blocked INT8
    (1, 130, 64, 4, True, 64, 8, False, "none"),
    (2, 161, 129, 8, True, 0, 4, True, "none"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"M{c[0]}N{c[1]}K{c[2]}w{c[3]}a{c[6]}" for c in CASES])
def test_integer_linear_identical_across_isas_and_close_to_float(case):
    M, N, K, wb, wsym, kblock, ab, asym_act, act = case
    rng = np.random.default_rng(M * 1000 + N)
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.1
    x = (rng.standard_normal((M, K)) + 0.3).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    outs = {}
    _core.set_threads(2)  # decode rows split their channels between the threads
    for isa in ISAS:
        _core.set_isa(isa)
        if _core.active_isa() != isa:
            continue
        lin = _core.Linear(w, wb, wsym, 1, kblock, ab, asym_act, bias, activation=act)
        outs[isa] = lin.forward(x)
    ys = list(outs.values())
    for y in ys[1:]:
        assert np.array_equal(y, ys[0]), "integer GEMM differs between ISAs"
    # Float reference on the dequantized operands (the math contract).
    q, s, z = _core.quantize(w, wb, wsym, 1, kblock or K)
    wd = _core.dequantize(q, s, z, wb, wsym, 1, kblock or K)
    qx, sx, zx = _core.quantize(x, ab, asym_act, 1, K)
    xd = _core.dequantize(qx, sx, zx, ab, asym_act, 1, K)
    ref = xd.astype(np.float64) @ wd.T.astype(np.float64) + bias
    if act != "none":
        ref = _gelu(ref, act)
    err = np.abs(ys[0] - ref).max() / max(1.0, np.abs(ref).max())
    assert err < 1e-5


@pytest.mark.parametrize("M,N,K", [(1, 37, 70), (7, 129, 33), (70, 64, 200)])
def test_float_linear_isas_agree(M, N, K):
    rng = np.random.default_rng(K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    for isa in ISAS:
        _core.set_isa(isa)
        if _core.active_isa() != isa:
            continue
        y = _core.Linear(w).forward(x)
        assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5, isa


def test_linear_rejects_bad_input():
    lin = _core.Linear(np.ones((4, 8), np.float32), 8, True, 1, 0, 8, True, None)
    with pytest.raises(ValueError, match="x must be a float32"):
        lin.forward(np.ones((2, 8), np.float64))
    with pytest.raises(ValueError, match=r"Linear expects F32 \[M, 8\]"):
        lin.forward(np.ones((2, 7), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lin.forward(np.full((2, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="activation"):
        _core.Linear(np.ones((4, 8), np.float32), activation="relu")
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'"):
        _core.set_isa("sse9")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_integer_linear_names_the_row_with_nan_or_inf_at_any_position(bad):
    """One bad value anywhere in a row (first, between good values, in the tail past the last 16 or 64)
    fails the call on every ISA, for symmetric and asymmetric activations, INT8 and K-blocked INT4:
    the AVX-512 quantizer looks for NaN in its second pass, where min / max of the first may drop it."""
    K = 150
    rng = np.random.default_rng(3)
    w = rng.standard_normal((70, K)).astype(np.float32)
    for isa in ISAS:
        _core.set_isa(isa)
        if _core.active_isa() != isa:
            continue
        for wb, kblock in ((8, 0), (4, 32)):
            for sym in (True, False):
                lin = _core.Linear(w, wb, True, 1, kblock, 8, sym, None)
                for col in (0, 17, 63, 64, 140, K - 1):
                    x = rng.standard_normal((9, K)).astype(np.float32)
                    x[5, col] = x[7, col] = bad  # the error names the first bad row
                    with pytest.raises(ValueError, match=r"NaN or Inf.*(in row 5|at \[5, )"):
                        lin.forward(x)
                    x[5, col] = x[7, col] = 0.5
                    assert np.isfinite(lin.forward(x)).all()


def test_float_linear_applies_its_activation_and_names_its_kernel():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((9, 16)).astype(np.float32)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    plain = _core.Linear(w).forward(x)
    gelu = _core.Linear(w, activation="gelu").forward(x)
    np.testing.assert_allclose(gelu, _gelu(plain.astype(np.float64), "gelu"), rtol=1e-5, atol=1e-6)
    # The FP32 kernels' best level is avx512vnni: it serves amx too (the best level at or below the active one).
    levels = [name for name, _ in _core.cpu_isas()]
    best = "avx512vnni" if levels.index(_core.active_isa()) >= levels.index("avx512vnni") else "ref"
    assert _core.Linear(w).kernel == f"cpu/{best} f32"
    assert _core.Linear(w, 8, True, 1, 0, 8).kernel == f"cpu/{_core.active_isa()} int"
    if _core.active_isa() == "amx":  # K-blocks under 64 are handed to the AVX512-VNNI kernel (DESIGN 5.4)
        assert _core.Linear(w, 4, True, 1, 8, 8).kernel == "cpu/avx512vnni int"


def test_cpu_isa_table():
    names = [n for n, _ in _core.cpu_isas()]
    assert names[0] == "ref" and len(set(names)) == len(names)
    assert dict(_core.cpu_isas())[_core.active_isa()]


def test_peak_measure():
    _isa_or_skip("avx512vnni")
    assert _core.int8_peak_gops(1, 0.05) > 10


@pytest.mark.parametrize("family,scheme,opts", [
    ("bert", "w8a8", []), ("bert", "w4a8", ["--kblock", "32", "--asym"]),
    ("gpt2", "w8a8", ["--parts", "qkv,attn_out,fc1,fc2,head"]),
    ("llama", "w4/8a8", ["--parts", "qkv,attn_out,fc1,fc2,head"]),
])
def test_integer_models_agree_across_isas(tiny_models, tmp_path, family, scheme, opts):
    out = tmp_path / "q"
    subprocess.run([sys.executable, "-m", "finequant", "quantize", str(tiny_models[family]), "-o", str(out),
                    "--scheme", scheme, "--quiet", *opts], check=True)
    ids = np.random.RandomState(1).randint(0, 64, size=(3, 11)).astype(np.int64)
    results = []
    for isa in ISAS:
        _core.set_isa(isa)
        if _core.active_isa() != isa:
            continue
        results.append(finequant.Engine(str(out), threads=2).forward(ids))
    for r in results[1:]:
        assert np.abs(r - results[0]).max() <= 1e-5 * np.abs(results[0]).max()


def test_dram_bandwidth_measure():
    # Any machine reads memory at well over 0.5 GB/s; a sweep that skipped its loads would be absurdly fast.
    gbps = _core.dram_read_gbps(2, 64, 0.05)
    assert 0.5 < gbps < 10_000


def test_default_level_is_the_best_the_cpu_has():
    # Every level is on by default now (DESIGN 5.4): unforced, the active level is the highest supported one.
    if os.environ.get("FINEQUANT_ISA"):
        pytest.skip("FINEQUANT_ISA forces the level")
    supported = [name for name, ok in _core.cpu_isas() if ok]
    assert _core.active_isa() == supported[-1]


def test_peak_measures():
    names = dict(_core.cpu_isas())
    for unit, level in (("vnni", "avx512vnni"), ("amx", "amx"), ("amx-loads", "amx")):
        gops = _core.int8_peak_gops(1, 0.02, unit)
        assert (gops > 1.0) if names[level] else gops == 0.0
    if names["amx"]:  # the loads can only slow the products down (best of two, a margin for a noisy machine)
        peak = max(_core.int8_peak_gops(1, 0.1, "amx") for _ in range(2))
        assert _core.int8_peak_gops(1, 0.1, "amx-loads") < 1.3 * peak
    with pytest.raises(ValueError, match="unit"):
        _core.int8_peak_gops(1, 0.02, "avx")


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_bf16_float_precision(tiny_models, family):
    # An explicit choice: fp32 Linears multiply bf16 operands with fp32 sums where the CPU has AVX512-BF16
    # (DESIGN 5.4); elsewhere the Engine stays exact fp32.
    ids = np.random.RandomState(2).randint(0, 64, size=(2, 9)).astype(np.int64)
    exact = finequant.Engine(str(tiny_models[family]), threads=2).forward(ids)
    engine = finequant.Engine(str(tiny_models[family]), threads=2, float_precision="bf16")
    assert engine.float_precision == "bf16"
    rounded = engine.forward(ids)
    err = np.abs(rounded - exact).max() / np.abs(exact).max()
    if _core.bf16_available():
        assert _bf16_cpu()  # the CPU says it has AVX512-BF16
        assert 0 < err < 3e-2  # different (bf16 ran) and close (8 mantissa bits)
    else:
        assert err == 0


def _bf16_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return False


def test_float_precision_rejects_unknown_values(tiny_models):
    with pytest.raises(ValueError, match="float_precision"):
        finequant.Engine(str(tiny_models["gpt2"]), float_precision="fp16")
