"""scale_dtype "fp16" (DESIGN.md section 2): weight scales rounded to fp16 values before the integers are
computed, stored as fp32, promised by the file's "scale_dtype" and checked by the reader; the CLI's
default for schemes with INT4 weights."""
import contextlib
import io
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from finequant import Engine, ModelFileError  # noqa: E402
from finequant.quantize import dequantize, quantize_tensor, round_scale_to_half  # noqa: E402
from finequant.schemes import LinearQuant, parse_scheme  # noqa: E402
from finequant.simulate import read_records  # noqa: E402


def _cli(*args):
    from finequant.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_round_scale_to_half_is_nearest_half():
    s = torch.tensor([1.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 7874.0157, 65504.0, 2 ** -25, 3 * 2 ** -25, 1e-30])
    got = round_scale_to_half(s)
    want = torch.tensor([1.0, 1.0, 1.0 + 2 ** -9, 7876.0, 65504.0, 2 ** -24, 2 ** -23, 2 ** -24])
    assert torch.equal(got, want)  # ties to even; a scale that rounds to zero becomes 2^-24
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        round_scale_to_half(torch.tensor([65520.0]))


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_half_scales_quantize_with_the_rounded_scale(bits, symmetric):
    g = torch.Generator().manual_seed(bits * 2 + symmetric)
    x = torch.randn(6, 70, generator=g) * 0.05
    x[0, :32] = 1e-9  # a tiny block: its scale rounds to zero as a half
    plain = quantize_tensor(x, bits, symmetric, (1, 32))
    half = quantize_tensor(x, bits, symmetric, (1, 32), half_scales=True)
    assert torch.equal(half.scale, round_scale_to_half(plain.scale))
    assert torch.equal(half.scale.half().float(), half.scale)
    assert half.scale[0, 0] == 2 ** -24
    # The integers (and zero points) come from the rounded scales.
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    se = half.scale.repeat_interleave(32, 1)[:, :70]
    if symmetric:
        want = torch.clamp(torch.round(x / se), -qmax, qmax)
    else:
        lo = torch.clamp(torch.stack([x[:, i:i + 32].amin(1) for i in range(0, 70, 32)], 1), max=0.0)
        z = torch.clamp(torch.round(-lo / half.scale), 0, qmax)
        assert torch.equal(half.zero_point.float(), z)
        want = torch.clamp(torch.round(x / se) + z.repeat_interleave(32, 1)[:, :70], 0, qmax)
    assert torch.equal(half.q.float(), want)
    err = (dequantize(half) - x).abs().max() / x.abs().max()
    assert err < (0.08 if bits == 4 else 0.005)


def test_scheme_carries_scale_dtype():
    lq = parse_scheme("w4a8", scale_dtype="fp16").for_linear("fc1", 64, 128)
    assert lq.half_scales and lq.to_json()["scale_dtype"] == "fp16"
    assert LinearQuant.from_json(lq.to_json()) == lq
    assert "scale_dtype" not in parse_scheme("w4a8").for_linear("fc1", 64, 128).to_json()
    assert "scale_dtype" not in parse_scheme("fp32", scale_dtype="fp16").for_linear("fc1", 64, 128).to_json()
    head = parse_scheme("w8a8", parts="qkv,head", scale_dtype="fp16").for_linear("head", 96, 64)
    assert head.half_scales
    assert "scales=fp16" in parse_scheme("w4a8", scale_dtype="fp16").describe()
    with pytest.raises(ValueError, match="scale_dtype"):
        parse_scheme("w4a8", scale_dtype="bf16")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("llama") / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_cli_default_is_fp16_for_int4_schemes(llama, tmp_path):
    for scheme, opts, want in [("w4a8", [], "fp16"), ("w4/8a8", [], "fp16"), ("w8a8", [], "fp32"),
                               ("w4a8", ["--scale-dtype", "fp32"], "fp32"), ("w8a8", ["--scale-dtype", "fp16"], "fp16")]:
        out = tmp_path / f"{scheme.replace('/', '_')}{''.join(opts)}"
        code, _, err = _cli("quantize", llama, "-o", out, "--scheme", scheme, "--quiet", "--no-smooth", *opts)
        assert code == 0, err
        records = read_records(str(out))
        got = {r.scale_dtype for r in records.values() if r.weight_bits}
        assert got == {want}, (scheme, opts, got)
        if want == "fp16":
            from safetensors.numpy import load_file

            tensors = load_file(str(out / "model.safetensors"))
            scales = np.concatenate([v.ravel() for k, v in tensors.items() if k.endswith(".weight_scale")])
            assert np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
            code, info, _ = _cli("info", out)
            assert code == 0 and "fp16 scales" in info


def test_reader_refuses_a_scale_that_is_not_a_half(llama, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    code, _, err = _cli("quantize", llama, "-o", tmp_path / "q", "--scheme", "w4a8", "--quiet", "--no-smooth")
    assert code == 0, err
    Engine(str(tmp_path / "q"))  # the file as written loads
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "q", bad)
    path = bad / "model.safetensors"
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    module = "model.layers.1.mlp.down_proj"
    tensors[module + ".weight_scale"] = tensors[module + ".weight_scale"].copy()
    tensors[module + ".weight_scale"][0, 0] = np.nextafter(tensors[module + ".weight_scale"][0, 0], np.float32(1))
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match="not an exact fp16 value") as e:
        Engine(str(bad))
    assert module in str(e.value)
    quant = json.loads(meta["quantization"])
    quant[module]["scale_dtype"] = "bf16"
    meta["quantization"] = json.dumps(quant)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match="'scale_dtype' must be"):
        Engine(str(bad))
