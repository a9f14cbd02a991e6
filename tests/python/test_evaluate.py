"""finequant.evaluate on tiny cases whose answers are known in closed form (a stand-in engine)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from finequant.evaluate import cosine_agreement, perplexity


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
