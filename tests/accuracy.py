"""Accuracy helpers for engines run on real text: byte-token windows, next-token logits, perplexity, top-1 agreement,
KL divergence between two models' next-token distributions, and confidence intervals for agreement rates.

An engine here is anything with dsc's ``step(input_ids, position_ids, past) -> (logits, present)`` contract
(dsc.runtime.engine.Engine); ``empty_cache(batch)`` returns the empty past it starts from for a batch,
``[c.empty(batch) for c in engine.cache]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np

Step = Callable[[np.ndarray, np.ndarray, list], tuple[np.ndarray, list]]
EmptyCache = Callable[[int], list[np.ndarray]]


def token_windows(text: str, window: int, count: int) -> list[list[int]]:
    """The first ``count`` non-overlapping windows of ``window`` byte ids (token id = UTF-8 byte value)."""
    data = text.encode("utf-8")
    if count * window > len(data):
        raise ValueError(f"{count} windows of {window} tokens need {count * window} bytes; the text has {len(data)}")
    return [list(data[i * window : (i + 1) * window]) for i in range(count)]


def next_token_eval(
    step: Step, empty_cache: EmptyCache, windows: list[list[int]], batch: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Prefill the windows ``batch`` at a time (positions 0..w-1, empty cache; windows must be equally long when
    batch > 1). Returns (logits [n, w, V] as float32, targets [n, w-1]: the next token for every position but the
    last)."""
    logits = []
    for i in range(0, len(windows), batch):
        input_ids = np.asarray(windows[i : i + batch], dtype=np.int64)
        positions = np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape).copy()
        out, _ = step(input_ids, positions, empty_cache(len(input_ids)))
        logits.append(np.asarray(out, dtype=np.float32))
    return np.concatenate(logits), np.asarray(windows, dtype=np.int64)[:, 1:]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(logits: np.ndarray, ids: list[list[int]] | np.ndarray) -> float:
    """exp(mean next-token cross entropy): position t's logits predict ids[t + 1]; the last one predicts nothing."""
    ids = np.asarray(ids, dtype=np.int64)
    log_probs = log_softmax(np.asarray(logits)[:, :-1])
    nll = -np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions where two logit arrays of the same shape pick the same argmax token."""
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) in nats at every position (shape = logits' shape without the vocabulary axis), where P and Q are
    the softmax of the logits: sum_v P(v) (log P(v) - log Q(v)). Take P as the reference (fp32), Q as the
    approximation."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: {p_logits.shape} vs {q_logits.shape}")
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (E. B. Wilson, JASA 1927): unlike the normal approximation
    p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and keeps its coverage near p = 0 or 1, where agreement rates sit.
    It treats positions as independent trials; see ``bootstrap_interval`` for resampling whole windows."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    per_window: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over windows, resampling whole windows (rows of ``per_window``,
    [n_windows, positions]), so positions within a window, which are not independent, move together."""
    values = np.asarray(per_window, dtype=np.float64)
    if values.ndim != 2 or len(values) < 2:
        raise ValueError(f"need [windows >= 2, positions] values, got shape {values.shape}")
    rows = values.mean(1)
    picks = np.random.default_rng(seed).integers(0, len(rows), size=(resamples, len(rows)))
    means = rows[picks].mean(1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
