"""One Engine shared by many threads (docs/DESIGN.md, Reliability): 8 Python threads make mixed
forward / generate / embed calls on one W8A8 decoder and one W8A8 encoder Engine for a bounded time,
and every result must equal, bit for bit, the same call made alone. The bindings release the GIL,
so the calls really overlap in the C++ engine."""
import json
import random
import threading
import time

import numpy as np
import pytest

from finequant import Engine
from finequant.modelfile import quantize_folder
from finequant.schemes import parse_scheme

THREADS = 8
SECONDS = 6.0  # the stress phase; the whole module takes a few seconds more


def _with_tokenizer(folder, vocab_size):
    """A word-level tokenizer.json (w0 w1 ... as in conftest's BERT vocab), so that embed() runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(vocab_size - 5)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def engines(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    out = {}
    for family in ("llama", "bert"):
        folder = root / family
        quantize_folder(str(tiny_models[family]), str(folder), parse_scheme("w8a8"))
        if family == "bert":
            _with_tokenizer(folder, json.loads((tiny_models[family] / "config.json").read_text())["vocab_size"])
        out[family] = Engine(str(folder), threads=2)
    return out


def _calls(decoder, encoder):
    """(name, zero-argument call) pairs of every kind, shapes and options varied."""
    rng = np.random.default_rng(0)
    calls = []
    for i in range(6):
        B, T = 1 + i % 3, 3 + 4 * i
        ids = rng.integers(0, decoder.vocab_size, (B, T)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1:, : i % 3] = 0  # left padding on the later rows
        calls.append((f"decoder.forward {B}x{T}", lambda ids=ids, mask=mask: decoder.forward(ids, mask)))
        prompt = [int(t) for t in ids[0, : 2 + i]]
        opts = dict(max_new_tokens=4 + i) if i % 2 == 0 else dict(max_new_tokens=5, temperature=0.9, top_k=8, seed=i)
        calls.append((f"decoder.generate {opts}", lambda p=prompt, o=opts: decoder.generate(p, **o)))
        calls.append((f"decoder batched generate {B}x{T}",
                      lambda ids=ids, mask=mask: decoder._engine.generate(ids, mask, 3, 0.0, 0, 1.0, 0, [], None)))
        eids = rng.integers(0, encoder.vocab_size, (B, T)).astype(np.int64)
        calls.append((f"encoder.forward {B}x{T}", lambda ids=eids, mask=mask: encoder.forward(ids, mask)))
        texts = [" ".join(f"w{(7 * i + j) % 50}" for j in range(1 + (i + k) % 9)) for k in range(B)]
        calls.append((f"encoder.embed {len(texts)} texts", lambda t=texts: encoder.embed(t)))
    return calls


def _same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    return a == b


def test_mixed_calls_from_8_threads_match_serial_results(engines):
    calls = _calls(engines["llama"], engines["bert"])
    serial = [fn() for _, fn in calls]
    counts = [0] * len(calls)
    failures = []
    deadline = time.monotonic() + SECONDS
    start = threading.Barrier(THREADS)

    def worker(seed):
        order = list(range(len(calls)))
        random.Random(seed).shuffle(order)
        start.wait()
        while time.monotonic() < deadline and not failures:
            for i in order:
                name, fn = calls[i]
                try:
                    got = fn()
                except Exception as e:  # noqa: BLE001 - reported below
                    failures.append(f"{name}: {e!r}")
                    return
                if not _same(got, serial[i]):
                    failures.append(f"{name}: result differs from the serial call")
                    return
                counts[i] += 1

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert min(counts) >= THREADS, f"some calls ran fewer than {THREADS} times: {counts}"
