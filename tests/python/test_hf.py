"""Reading Hugging Face folders: families, canonical names, weight file variants, errors."""
import json
import shutil

import pytest
import torch

from finequant import hf


def test_bert_canonical(tiny_models):
    m = hf.load(tiny_models["bert"])
    assert m.family == "bert" and m.num_layers == 2
    assert "embeddings.word_embeddings.weight" in m.tensors
    assert not any(k.endswith("position_ids") or k.startswith(("bert.", "cls.")) for k in m.tensors)
    assert all(t.dtype == torch.float32 for t in m.tensors.values())
    parts = hf.linear_parts("bert", 2)
    assert len(parts) == 12 and parts["encoder.layer.1.intermediate.dense"] == "fc1"
    assert all(k + ".weight" in m.tensors for k in parts)


def test_gpt2_transposed_and_tied_head_dropped(tiny_models):
    from transformers import GPT2LMHeadModel

    m = hf.load(tiny_models["gpt2"])
    ref = GPT2LMHeadModel.from_pretrained(tiny_models["gpt2"])
    assert m.family == "gpt2"
    assert torch.equal(m.tensors["h.0.attn.c_attn.weight"], ref.transformer.h[0].attn.c_attn.weight.T)
    assert m.tensors["h.1.mlp.c_fc.weight"].shape == (128, 32)  # [out, in]
    assert m.tensors["h.1.mlp.c_proj.weight"].shape == (32, 128)
    assert "lm_head.weight" not in m.tensors and "wte.weight" in m.tensors
    assert not any(k.endswith((".attn.bias", ".attn.masked_bias")) for k in m.tensors)
    assert "h.0.attn.c_attn.bias" in m.tensors


def test_llama_untied_head_kept(tiny_models):
    m = hf.load(tiny_models["llama"])
    assert m.family == "llama" and "lm_head.weight" in m.tensors
    assert len(hf.linear_parts("llama", 2)) == 14
    assert m.tensors["model.layers.0.mlp.gate_proj.weight"].shape == (96, 64)


def test_sharded_and_bin(tiny_models, tmp_path):
    from transformers import LlamaForCausalLM

    ref = hf.load(tiny_models["llama"])
    model = LlamaForCausalLM.from_pretrained(tiny_models["llama"])
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").exists()
    got = hf.load(sharded)
    assert got.tensors.keys() == ref.tensors.keys()
    assert all(torch.equal(got.tensors[k], ref.tensors[k]) for k in ref.tensors)

    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(tiny_models["gpt2"] / "config.json", binary)
    from safetensors.torch import load_file
    # like the original gpt2 pytorch_model.bin: no "transformer." prefix, fp16 is read as fp32
    state = {k.removeprefix("transformer."): v.half()
             for k, v in load_file(tiny_models["gpt2"] / "model.safetensors").items()}
    torch.save(state, binary / "pytorch_model.bin")
    got = hf.load(binary)
    ref = hf.load(tiny_models["gpt2"])
    assert got.tensors.keys() == ref.tensors.keys()
    assert all(torch.equal(got.tensors[k], ref.tensors[k].half().float()) for k in ref.tensors)


def test_errors(tiny_models, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(tmp_path / "empty")
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(NotImplementedError, match="'t5'.*bert"):
        hf.load(t5)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(tiny_models["bert"] / "config.json", noweights)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load(noweights)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_models["bert"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="cannot read"):
        hf.load(corrupt)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_models["bert"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        hf.load(truncated)
    badbin = tmp_path / "badbin"
    badbin.mkdir()
    shutil.copy(tiny_models["bert"] / "config.json", badbin)
    (badbin / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        hf.load(badbin)
