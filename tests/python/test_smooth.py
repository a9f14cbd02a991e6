"""Outlier smoothing (finequant.smooth): the fp32 function is unchanged, W8A8 error drops where a
channel carries outliers, and the CLI applies it by default where activations are quantized."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from finequant import Engine, hf, smooth
from finequant.cli import main
from finequant.lkd import load_torch_model
from finequant.modelfile import quantize_model, save
from finequant.schemes import parse_scheme

SMOOTHED = {"bert": {"attn_out"}, "gpt2": {"qkv", "fc1", "attn_out"}, "llama": {"qkv", "fc1", "attn_out", "fc2"}}


def _torch_out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_smoothing_keeps_the_fp32_function(tiny_models, tmp_path, family):
    src = tiny_models[family]
    model = hf.load(src)
    original = {k: v.clone() for k, v in model.tensors.items()}
    tm = load_torch_model(str(src), family)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _torch_out(tm, ids)

    info = smooth.smooth_model(model, parse_scheme("w8a8"), tm, samples=4, seq=16)
    assert set(info["parts"]) == SMOOTHED[family] and info["alpha"] == smooth.DEFAULT_ALPHA
    changed = [k for k in original if not torch.equal(original[k], model.tensors[k])]
    assert changed, "smoothing changed no tensor"
    # the transformers model now holds the smoothed tensors and computes the same function
    np.testing.assert_allclose(_torch_out(tm, ids), before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    # and so does the engine on them (fp32 file)
    tensors, meta = quantize_model(model, parse_scheme("fp32"))
    save(str(tmp_path / "fp32"), tensors, meta, tokenizer_src=str(src))
    got = Engine(str(tmp_path / "fp32"), threads=1).forward(ids.numpy())
    np.testing.assert_allclose(got, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


def test_weight_only_schemes_are_not_smoothed(tiny_models):
    model = hf.load(tiny_models["llama"])
    assert smooth.smoothable_parts(model, parse_scheme("w8a16")) == []
    assert smooth.smoothable_parts(model, parse_scheme("w8a8", parts="fc1,fc2")) == ["fc1", "fc2"]


def _with_outliers(src, dst):
    """The tiny llama with two input channels 40x larger at every pre-norm (as real decoders have)."""
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40
            layer.post_attention_layernorm.weight[[5, 40]] *= 40
    m.save_pretrained(dst)
    return dst


def test_smoothing_reduces_w8a8_error_with_outlier_channels(tiny_models, tmp_path):
    src = _with_outliers(tiny_models["llama"], tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, 64, (2, 24))
    ref = Engine(str(src), threads=1).forward(ids)  # the HF folder runs in fp32
    errors = {}
    for name, opts in (("plain", ["--no-smooth"]), ("smoothed", [])):
        out = tmp_path / name
        assert main(["quantize", str(src), "-o", str(out), "--quiet", "--a-sym"] + opts) == 0
        got = Engine(str(out), threads=1).forward(ids)
        errors[name] = float(np.abs(got - ref).mean() / np.abs(ref).mean())
    assert errors["smoothed"] < 0.7 * errors["plain"], errors


def test_cli_default_records_smoothing(tiny_models, tmp_path):
    def meta(*opts):
        out = tmp_path / "-".join(opts or ("default",))
        assert main(["quantize", str(tiny_models["llama"]), "-o", str(out), "--quiet", *opts]) == 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return f.metadata()

    m = meta()
    # the default: asymmetric activations, symmetric weights, an INT8 LM head with its input rotated
    assert m["scheme"] == "w8a8 a-asym parts=qkv,attn_out,fc1,fc2,head head-rotate=64"
    info = json.loads(m["smoothing"])
    assert info["alpha"] == 0.7 and set(info["parts"]) == SMOOTHED["llama"]
    assert json.loads(meta("--smooth-alpha", "0.4")["smoothing"])["alpha"] == 0.4
    assert "smoothing" not in meta("--no-smooth")
    assert "smoothing" not in meta("--scheme", "w8a16")
    assert meta("--sym")["scheme"] == "w8a8 parts=qkv,attn_out,fc1,fc2,head head-rotate=64"
