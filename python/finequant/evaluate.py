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
    in that window. Returns {"perplexity", "tokens" (predicted), "windows"}."""
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


def cosine_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two embedding matrices of the same shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)
