import pytest

from finequant.schemes import PARTS, LinearQuant, parse_scheme


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_float_schemes_quantize_nothing(name):
    s = parse_scheme(name)
    assert not s.is_quantized and s.float_dtype == name
    for part in PARTS:
        assert s.for_linear(part, 64, 32) == LinearQuant(part=part)
    assert s.describe() == name


def test_w8a8_default_per_channel():
    lq = parse_scheme("w8a8").for_linear("qkv", 96, 32)
    assert (lq.weight_bits, lq.weight_symmetric, lq.tile, lq.act_bits, lq.act_symmetric) == \
        (8, True, (1, 32), 8, True)
    assert lq.to_json() == {"part": "qkv", "weight_bits": 8, "weight_symmetric": True,
                            "tile": [1, 32], "act_bits": 8, "act_symmetric": True}


def test_int4_default_kblock32():
    s = parse_scheme("w4a16")
    assert s.for_linear("fc1", 64, 128).tile == (1, 32)
    assert s.for_linear("fc1", 64, 128).act_bits == 0
    assert s.for_linear("fc1", 64, 16).tile == (1, 16)  # K smaller than the default block


def test_mixed_w4_8():
    s = parse_scheme("w4/8a8")
    assert s.for_linear("qkv", 8, 8).weight_bits == 8
    assert s.for_linear("attn_out", 8, 8).weight_bits == 8
    assert s.for_linear("fc1", 8, 8).weight_bits == 4
    assert s.for_linear("fc2", 8, 8).weight_bits == 4
    assert all(s.for_linear(p, 8, 8).act_bits == 8 for p in PARTS)
    assert parse_scheme("w4/8a16").for_linear("fc2", 8, 8).act_bits == 0


def test_w4a4_and_a32():
    lq = parse_scheme("W4A4").for_linear("fc2", 8, 64)
    assert (lq.weight_bits, lq.act_bits) == (4, 4)
    assert parse_scheme("w8a32").for_linear("fc2", 8, 64).act_bits == 0


def test_grouping():
    assert parse_scheme("w8a8", grouping="tensor").for_linear("fc1", 12, 10).tile == (12, 10)
    assert parse_scheme("w4a8", grouping="channel").for_linear("fc1", 12, 10).tile == (1, 10)
    assert parse_scheme("w8a8", grouping=("rows", 4)).for_linear("fc1", 12, 10).tile == (3, 10)
    assert parse_scheme("w8a8", grouping=("kblock", 4)).for_linear("fc1", 12, 10).tile == (1, 4)
    with pytest.raises(ValueError, match="does not divide"):
        parse_scheme("w8a8", grouping=("rows", 5)).for_linear("fc1", 12, 10)
    with pytest.raises(ValueError, match="kblock 64 is larger"):
        parse_scheme("w8a8", grouping=("kblock", 64)).for_linear("fc1", 12, 10)
    with pytest.raises(ValueError, match="grouping"):
        parse_scheme("w8a8", grouping="rows")
    with pytest.raises(ValueError, match="positive"):
        parse_scheme("w8a8", grouping=("kblock", 0))


def test_asym_flags():
    s = parse_scheme("w8a8", weight_symmetric=False)
    lq = s.for_linear("qkv", 4, 4)
    assert not lq.weight_symmetric and lq.act_symmetric
    assert s.describe() == "w8a8 w-asym"
    assert parse_scheme("w8a8", weight_symmetric=False, act_symmetric=False).describe() == "w8a8 asym"
    assert parse_scheme("w8a8", act_symmetric=False).describe() == "w8a8 a-asym"
    assert parse_scheme("w8a16", weight_symmetric=False, act_symmetric=False).describe() == "w8a16 asym"


def test_parts():
    s = parse_scheme("w4a8", parts="fc1")
    assert s.for_linear("fc1", 8, 8).weight_bits == 4
    for part in ("qkv", "attn_out", "fc2"):
        lq = s.for_linear(part, 8, 8)
        assert lq.weight_bits == 0 and lq.act_bits == 0 and "tile" not in lq.to_json()
    s = parse_scheme("w8a8", parts=["fc2", "qkv", "qkv"], grouping=("kblock", 64))
    assert s.parts == ("qkv", "fc2")
    assert s.describe() == "w8a8 kblock=64 parts=qkv,fc2"
    with pytest.raises(ValueError, match="unknown part"):
        parse_scheme("w8a8", parts="qkv,mlp")
    with pytest.raises(ValueError, match="unknown part"):
        parse_scheme("w8a8").for_linear("lm_head", 8, 8)


@pytest.mark.parametrize("bad", ["w2a8", "w8", "int8", "w8a8x", "w16a16", ""])
def test_unknown_scheme(bad):
    with pytest.raises(ValueError, match="unknown scheme"):
        parse_scheme(bad)


def test_json_roundtrip():
    lq = parse_scheme("w4a8", weight_symmetric=False).for_linear("fc1", 8, 64)
    assert LinearQuant.from_json(lq.to_json()) == lq


def test_head_part_is_opt_in_and_int8():
    assert "head" not in parse_scheme("w8a8").parts
    assert parse_scheme("w8a8").for_linear("head", 10, 8).weight_bits == 0
    lq = parse_scheme("w4a4", parts="fc1,head", grouping=("kblock", 4)).for_linear("head", 10, 8)
    assert (lq.weight_bits, lq.tile, lq.act_bits) == (8, (1, 8), 8)  # never INT4 / A4 on the logits
    assert parse_scheme("w4a16", parts="head").for_linear("head", 10, 8).act_bits == 0
    assert parse_scheme("w8a8", parts="head,qkv").describe() == "w8a8 parts=qkv,head"


def test_head_rotation_is_the_quantized_heads_own():
    parts = "qkv,attn_out,fc1,fc2,head"
    scheme = parse_scheme("w8a8", parts=parts, head_rotation=32)
    assert scheme.for_linear("head", 50, 96).rotation == 32
    int4 = parse_scheme("w4a8", parts=parts, head_bits=4, head_rotation=32).for_linear("head", 50, 96)
    assert (int4.weight_bits, int4.rotation) == (4, 32)  # GPTQ rounds it in the rotated domain
    assert scheme.for_linear("qkv", 50, 96).rotation == 0  # the block GEMMs keep `rotation`'s (none)
    assert parse_scheme("w4a8", parts=parts, rotation=64, head_rotation=32).for_linear("fc1", 50, 128).rotation == 64
    assert scheme.describe() == "w8a8 parts=qkv,attn_out,fc1,fc2,head head-rotate=32"
    with pytest.raises(ValueError, match="does not divide"):
        scheme.for_linear("head", 50, 80)  # 32 does not divide 80
    for bad in (dict(name="w8a8", head_rotation=32),  # no head in the parts
                dict(name="w8a16", parts=parts, head_rotation=32)):  # weight-only: dequantized at load
        with pytest.raises(ValueError, match="head_rotation applies"):
            parse_scheme(bad.pop("name"), **bad)
    with pytest.raises(ValueError, match="power of two"):
        parse_scheme("w8a8", parts=parts, head_rotation=48)


def test_int4_head_is_explicit_in_k_blocks_of_16_or_the_schemes_grouping():
    parts = "qkv,attn_out,fc1,fc2,head"
    lq = parse_scheme("w4a8", parts=parts, head_bits=4).for_linear("head", 50, 96)
    assert (lq.weight_bits, lq.tile, lq.act_bits) == (4, (1, 16), 8)  # the head's default K-blocks of 16
    lq = parse_scheme("w4a8", parts=parts, head_bits=4, grouping=("kblock", 48)).for_linear("head", 50, 96)
    assert lq.tile == (1, 48)
    assert parse_scheme("w4a8", parts=parts, head_bits=4).describe().endswith("head=int4")
    with pytest.raises(ValueError, match="add 'head'"):
        parse_scheme("w4a8", head_bits=4)
    with pytest.raises(ValueError, match="head_bits"):
        parse_scheme("w4a8", parts=parts, head_bits=2)
