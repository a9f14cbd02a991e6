"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) and the config dictionary.

Small valid inputs, so that mutations start inside the formats: finequant model files of every
record kind (INT8 / INT4, symmetric / asymmetric, rotation, fp and bf16 tensors), config.json files
of every architecture and Llama-family variant (as transformers writes them), and byte strings for
the engine-API target. Deterministic; run `python fuzz/make_seeds.py` after changing the formats.
"""
import json
import os
import random
import re
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def safetensors_bytes(tensors, metadata):
    """tensors: list of (name, dtype string, shape, raw bytes), laid out contiguously in order."""
    header, offset, data = {}, 0, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-(8 + len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def model_files():
    rng = np.random.default_rng(0)
    config = json.dumps({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 8, "max_position_embeddings": 8})

    def meta(quant, architecture="bert", scheme="w8a8"):
        return {"format": "finequant", "format_version": "1", "architecture": architecture, "config": config,
                "scheme": scheme, "quantization": json.dumps(quant)}

    def i8(shape):
        return rng.integers(-127, 128, shape).astype(np.int8).tobytes()

    def f32(shape, positive=False):
        v = rng.random(shape) + 0.1 if positive else rng.standard_normal(shape)
        return v.astype(np.float32).tobytes()

    def nibbles(shape, symmetric):  # two 4-bit codes per byte, never 8 (-8) when symmetric
        lo, hi = (rng.integers(-7, 8, shape) & 0xF, rng.integers(-7, 8, shape) & 0xF) if symmetric else \
                 (rng.integers(0, 16, shape), rng.integers(0, 16, shape))
        return (lo | (hi << 4)).astype(np.uint8).tobytes()

    rec = lambda part, wb, sym=True, tile=(1, 8), ab=8, asym=True, **kw: dict(  # noqa: E731
        part=part, weight_bits=wb, weight_symmetric=sym, tile=list(tile), act_bits=ab, act_symmetric=asym, **kw)
    files = {}
    files["w8a8_sym"] = safetensors_bytes(
        [("l.q.weight", "I8", (4, 8), i8((4, 8))), ("l.q.weight_scale", "F32", (4, 1), f32((4, 1), True)),
         ("l.q.bias", "F32", (4,), f32((4,)))], meta({"l.q": rec("qkv", 8)}))
    files["w4_sym_groups"] = safetensors_bytes(
        [("l.fc1.weight", "U8", (4, 8), nibbles((4, 8), True)),
         ("l.fc1.weight_scale", "F32", (4, 2), f32((4, 2), True))],
        meta({"l.fc1": rec("fc1", 4, tile=(1, 8), ab=0)}, scheme="w4a16"))
    files["w4_asym_zero_points"] = safetensors_bytes(
        [("l.fc2.weight", "U8", (2, 4), nibbles((2, 4), False)),
         ("l.fc2.weight_scale", "F32", (1, 2), f32((1, 2), True)),
         ("l.fc2.weight_zero_point", "U8", (1, 2), bytes([3, 12]))],
        meta({"l.fc2": rec("fc2", 4, sym=False, tile=(2, 6), asym=False)}, scheme="w4a8"))
    files["w8_rotation"] = safetensors_bytes(
        [("l.o.weight", "I8", (2, 8), i8((2, 8))), ("l.o.weight_scale", "F32", (2, 1), f32((2, 1), True))],
        meta({"l.o": rec("attn_out", 8, rotation=4)}))
    files["fp_and_bf16"] = safetensors_bytes(
        [("l.head.weight", "BF16", (3, 4), rng.integers(0, 1 << 16, (3, 4)).astype(np.uint16).tobytes()),
         ("emb", "F16", (2, 2), np.ones((2, 2), np.float16).tobytes()), ("pos", "F32", (2, 2), f32((2, 2))),
         ("ids", "I64", (2,), np.array([1, 2], np.int64).tobytes()), ("odd", "U8", (3,), b"\x01\x02\x03"),
         ("n", "I32", (1,), b"\x05\x00\x00\x00")],
        meta({"l.head": rec("head", 0, ab=0)}, architecture="llama", scheme="fp32"))
    files["empty_tensors"] = safetensors_bytes(
        [("zero", "F32", (0, 4), b""), ("scalar", "F32", (), f32(()))], meta({}, architecture="gpt2", scheme="fp32"))
    # A whole (tiny) W8A8 Llama as the engine loads it.
    files["tiny_llama_w8a8"] = safetensors_bytes(tiny_llama_tensors(rng, i8, f32), {
        "format": "finequant", "format_version": "1", "architecture": "llama", "scheme": "w8a8",
        "config": json.dumps({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 8}),
        "quantization": json.dumps({f"model.layers.0.{m}": rec(p, 8) for m, p in LLAMA_LINEARS})})
    return files


LLAMA_LINEARS = [("self_attn.q_proj", "qkv"), ("self_attn.k_proj", "qkv"), ("self_attn.v_proj", "qkv"),
                 ("self_attn.o_proj", "attn_out"), ("mlp.gate_proj", "fc1"), ("mlp.up_proj", "fc1"),
                 ("mlp.down_proj", "fc2")]


def tiny_llama_tensors(rng, i8, f32):
    out = [("model.embed_tokens.weight", "F32", (8, 8), f32((8, 8)))]
    p = "model.layers.0."
    out += [(p + "input_layernorm.weight", "F32", (8,), f32((8,), True)),
            (p + "post_attention_layernorm.weight", "F32", (8,), f32((8,), True))]
    shapes = {"self_attn.q_proj": (8, 8), "self_attn.k_proj": (4, 8), "self_attn.v_proj": (4, 8),
              "self_attn.o_proj": (8, 8), "mlp.gate_proj": (8, 8), "mlp.up_proj": (8, 8), "mlp.down_proj": (8, 8)}
    for m, _ in LLAMA_LINEARS:
        n, k = shapes[m]
        out += [(p + m + ".weight", "I8", (n, k), i8((n, k))), (p + m + ".weight_scale", "F32", (n, 1), f32((n, 1), True))]
    out += [("model.norm.weight", "F32", (8,), f32((8,), True)), ("lm_head.weight", "F32", (8, 8), f32((8, 8)))]
    return out


def configs():
    """architecture -> config.json texts as transformers writes them (tiny sizes)."""
    import transformers as tf

    small = dict(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                 max_position_embeddings=64)
    llama_like = dict(small, num_key_value_heads=2)
    out = {
        "bert": [tf.BertConfig(**small)],
        "gpt2": [tf.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=4, n_positions=64)],
        "llama": [tf.LlamaConfig(**llama_like),
                  tf.LlamaConfig(**llama_like, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 32}),
                  tf.LlamaConfig(**llama_like, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                             "original_max_position_embeddings": 32}),
                  tf.LlamaConfig(**llama_like, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                  tf.LlamaConfig(**llama_like, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                  tf.MistralConfig(**llama_like, sliding_window=16),
                  tf.Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=16, max_window_layers=1),
                  tf.Phi3Config(**llama_like), tf.GemmaConfig(**llama_like, head_dim=4),
                  tf.Gemma2Config(**llama_like, head_dim=4, sliding_window=16)],
        "bart": [tf.BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24,
                               max_position_embeddings=64)],
    }
    return {arch: [c.to_json_string() for c in cs] for arch, cs in out.items()}


def config_dictionary():
    """Every quoted key of the config reader, for libFuzzer's -dict."""
    src = open(os.path.join(ROOT, "cpp", "src", "models", "config.cc")).read()
    words = sorted(set(re.findall(r'"([a-z_0-9]{3,})"', src)))
    return "".join(f'"\\"{w}\\""\n' for w in words)


def write(folder, name, data):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def main():
    corpus = os.path.join(HERE, "corpus")
    for name, data in model_files().items():
        write(os.path.join(corpus, "fuzz_model_file"), name + ".safetensors", data)
    for arch, texts in configs().items():
        for i, text in enumerate(texts):
            model_type = json.loads(text).get("model_type", arch)
            write(os.path.join(corpus, "fuzz_config"), f"{arch}_{model_type}_{i}.txt", arch + "\n" + text)
    r = random.Random(0)
    for i in range(8):
        write(os.path.join(corpus, "fuzz_engine_api"), f"random_{i}", bytes(r.randrange(256) for _ in range(16 + 24 * i)))
    write(HERE, "config.dict", config_dictionary())
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(corpus) for f in fs)
    print(f"seed corpora: {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
