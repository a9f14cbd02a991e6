"""Bounded resources (docs/DESIGN.md, Reliability): the engine estimates a load's and a call's memory
up front and refuses, with a MemoryError naming the limit, what would not fit under max_memory (or
the machine's available memory), before allocating anything."""
import json
import struct

import numpy as np
import pytest

from finequant import Engine


@pytest.fixture(scope="module")
def gpt2_dir(tiny_models):
    return str(tiny_models["gpt2"])


def test_estimates_grow_with_the_call(gpt2_dir):
    eng = Engine(gpt2_dir, threads=1)
    assert eng.max_memory == 0
    assert eng.weight_memory > 0
    small, wide, long = eng.call_memory(1, 4), eng.call_memory(8, 4), eng.call_memory(1, 16)
    assert 0 < small < wide and small < long
    # generate's KV cache is bounded by max_positions, whatever max_new_tokens asks for
    assert eng.call_memory(2, 4, 10**9) == eng.call_memory(2, 4, eng.max_positions)
    assert eng.call_memory(2, 4, 8) < eng.call_memory(2, 4, 20)


def test_a_call_past_max_memory_is_refused(gpt2_dir):
    probe = Engine(gpt2_dir, threads=1)
    limit = probe.weight_memory + 2 * probe.call_memory(1, 8)
    eng = Engine(gpt2_dir, threads=1, max_memory=limit)
    assert eng.max_memory == limit
    ids = np.arange(8, dtype=np.int64).reshape(1, 8) % 64
    np.testing.assert_array_equal(eng.forward(ids), probe.forward(ids))  # within the limit: unchanged
    big = np.zeros((64, 32), dtype=np.int64)
    assert probe.call_memory(64, 32) + probe.weight_memory > limit
    with pytest.raises(MemoryError, match=r"forward on \[64, 32\] needs about .* more than max_memory"):
        eng.forward(big)
    with pytest.raises(MemoryError, match=r"generate on \[64, 32\].*KV cache.*max_memory"):
        eng._engine.generate(big, None, 4, 0.0, 0, 1.0, 0, [], None)
    assert eng.generate([1, 2, 3], max_new_tokens=3) == probe.generate([1, 2, 3], max_new_tokens=3)


def test_weights_past_max_memory_refuse_the_load(gpt2_dir):
    weights = Engine(gpt2_dir, threads=1).weight_memory
    with pytest.raises(MemoryError, match=r"loading .* needs about .*weights .*more than max_memory"):
        Engine(gpt2_dir, threads=1, max_memory=weights // 2)
    with pytest.raises(ValueError, match="max_memory must be >= 0"):
        Engine(gpt2_dir, threads=1, max_memory=-1)


def test_huge_max_new_tokens_on_a_model_with_huge_positions_fails_fast(tmp_path):
    """max_position_embeddings 10^12: max_new_tokens 10^9 would need a KV cache of terabytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=10**12)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    eng = Engine(str(tmp_path), threads=1)
    assert len(eng.generate([1, 2, 3], max_new_tokens=5)) == 5
    with pytest.raises(MemoryError, match=r"generate on \[1, 3\] needs about .*KV cache"):
        eng.generate([1, 2, 3], max_new_tokens=10**9)


def _sparse_model_file(path, vocab, hidden):
    """A finequant file whose embedding [vocab, hidden] F32 exists only as a hole (a sparse file)."""
    config = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden, "num_hidden_layers": 1,
              "num_attention_heads": 1, "max_position_embeddings": 16}
    nbytes = vocab * hidden * 4
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [vocab, hidden], "data_offsets": [0, nbytes]},
              "__metadata__": {"format": "finequant", "format_version": "1", "architecture": "llama",
                               "config": json.dumps(config), "scheme": "fp32", "quantization": "{}"}}
    h = json.dumps(header).encode()
    h += b" " * (-(8 + len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + nbytes)
    return str(path)


def test_a_model_larger_than_the_machine_is_refused_at_load(tmp_path):
    # vocab 10^9 x hidden 1024: 4 TB of fp32 weights, refused before anything is read or allocated
    path = _sparse_model_file(tmp_path / "huge.safetensors", 10**9, 1024)
    with pytest.raises(MemoryError, match=r"needs about 3\.\d+ TiB \(weights .*\), more than the .* of physical "
                                          r"memory available"):
        Engine(path, threads=1)
    with pytest.raises(MemoryError, match="max_memory 1.0 GiB"):
        Engine(path, threads=1, max_memory=1 << 30)
