"""Accuracy helpers for engines run on real text: byte-token windows, next-token logits, perplexity, top-1 agreement.

An engine here is anything with dsc's ``step(input_ids, position_ids, past) -> (logits, present)`` contract
(dsc.runtime.engine.Engine); ``cache_empty`` is the empty past it starts from, ``[c.empty(1) for c in engine.cache]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Step = Callable[[np.ndarray, np.ndarray, list], tuple[np.ndarray, list]]


def token_windows(text: str, window: int, count: int) -> list[list[int]]:
    """The first ``count`` non-overlapping windows of ``window`` byte ids (token id = UTF-8 byte value)."""
    data = text.encode("utf-8")
    if count * window > len(data):
        raise ValueError(f"{count} windows of {window} tokens need {count * window} bytes; the text has {len(data)}")
    return [list(data[i * window : (i + 1) * window]) for i in range(count)]


def next_token_eval(
    step: Step, cache_empty: Sequence[np.ndarray], windows: list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Prefill each window alone (batch 1, positions 0..w-1, empty cache). Returns (logits [n, w, V] as float32,
    targets [n, w-1]: the next token for every position but the last)."""
    logits = []
    for ids in windows:
        input_ids = np.asarray([ids], dtype=np.int64)
        positions = np.arange(len(ids), dtype=np.int64)[None]
        out, _ = step(input_ids, positions, list(cache_empty))
        logits.append(np.asarray(out, dtype=np.float32))
    return np.concatenate(logits), np.asarray(windows, dtype=np.int64)[:, 1:]


def perplexity(logits: np.ndarray, ids: list[list[int]] | np.ndarray) -> float:
    """exp(mean next-token cross entropy): position t's logits predict ids[t + 1]; the last one predicts nothing."""
    ids = np.asarray(ids, dtype=np.int64)
    pred = np.asarray(logits, dtype=np.float64)[:, :-1]
    pred = pred - pred.max(-1, keepdims=True)
    log_probs = pred - np.log(np.exp(pred).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions where two logit arrays of the same shape pick the same argmax token."""
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    return float((a.argmax(-1) == b.argmax(-1)).mean())
