"""The accuracy helpers (tests/accuracy.py) against hand-computed values, so the FP8 and trained-model tests that
lean on them measure what they say."""

import math

import numpy as np
import pytest
from accuracy import (
    bootstrap_interval,
    kl_divergence,
    log_softmax,
    next_token_eval,
    perplexity,
    token_windows,
    top1_agreement,
    wilson_interval,
)


def test_wilson_interval_matches_hand_computed_values():
    # 8 of 10 at 95%: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10), the textbook (0.490, 0.943).
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # 990 of 1000: the normal approximation would give 0.990 +- 0.0062; Wilson is skewed towards 0.5.
    lo, hi = wilson_interval(990, 1000)
    assert lo == pytest.approx(0.98169, abs=1e-5) and hi == pytest.approx(0.99456, abs=1e-5)
    assert hi - 0.99 < 0.99 - lo


def test_wilson_interval_edges_and_confidence():
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0 < hi < 0.1
    lo, hi = wilson_interval(50, 50)
    assert hi == 1.0 and 0.9 < lo < 1
    assert wilson_interval(500, 1000, 0.99)[0] < wilson_interval(500, 1000, 0.95)[0]  # wider at 99%
    assert wilson_interval(5000, 10000)[1] - wilson_interval(5000, 10000)[0] < 0.02  # shrinks like 1/sqrt(n)
    for bad in ((1, 0), (-1, 10), (11, 10)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(5, 10, 1.0)


def test_wilson_interval_covers_the_true_rate():
    # 400 binomial samples of 2000 trials at p = 0.99: about 95% of the intervals must contain p.
    rng = np.random.default_rng(0)
    hits = [lo <= 0.99 <= hi for lo, hi in (wilson_interval(int(k), 2000) for k in rng.binomial(2000, 0.99, 400))]
    assert 0.92 <= np.mean(hits) <= 0.98


def test_bootstrap_interval_over_windows():
    rng = np.random.default_rng(1)
    per_window = (rng.random((200, 64)) < 0.9).astype(float)
    lo, hi = bootstrap_interval(per_window)
    assert lo < per_window.mean() < hi and hi - lo < 0.02
    assert bootstrap_interval(per_window) == (lo, hi)  # seeded: deterministic
    # Windows that agree all-or-nothing carry one window's worth of evidence each: a much wider interval.
    blocks = np.repeat(per_window[:, :1], 64, axis=1)
    blo, bhi = bootstrap_interval(blocks)
    assert bhi - blo > 4 * (hi - lo)
    with pytest.raises(ValueError):
        bootstrap_interval(np.ones(10))


def test_kl_divergence_matches_hand_computed_values():
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q) == pytest.approx([expected], rel=1e-12)
    assert kl_divergence(q, p)[0] != pytest.approx(expected)  # not symmetric
    assert kl_divergence(p + 3.0, q - 7.0) == pytest.approx([expected], rel=1e-12)  # logits, not probabilities


def test_kl_divergence_shape_and_sign():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 5, 256)).astype(np.float32)
    b = a + rng.normal(scale=0.1, size=a.shape).astype(np.float32)
    kl = kl_divergence(a, b)
    assert kl.shape == (3, 5) and (kl >= 0).all() and kl.max() < 0.05
    assert np.abs(kl_divergence(a, a)).max() < 1e-12
    with pytest.raises(ValueError):
        kl_divergence(a, b[:, :4])


def test_perplexity_and_agreement():
    ids = [[1, 2, 3]]
    logits = np.zeros((1, 3, 4))
    assert perplexity(logits, ids) == pytest.approx(4.0)  # uniform over 4
    logits[0, 0, 2] = logits[0, 1, 3] = 50.0  # certain and right
    assert perplexity(logits, ids) == pytest.approx(1.0)
    assert np.exp(log_softmax(logits)).sum(-1) == pytest.approx(np.ones((1, 3)))
    other = logits.copy()
    other[0, 2, 1] = 1.0
    assert top1_agreement(logits, other) == pytest.approx(2 / 3)


def test_token_windows_and_batched_next_token_eval():
    assert token_windows("abcdef", 2, 3) == [[97, 98], [99, 100], [101, 102]]
    with pytest.raises(ValueError):
        token_windows("abc", 2, 2)
    calls = []

    def step(input_ids, position_ids, past):  # logits that encode (token, position) to check the plumbing
        calls.append((input_ids.shape, past[0].shape))
        assert (position_ids == np.arange(input_ids.shape[1])).all()
        logits = np.zeros((*input_ids.shape, 8), np.float32)
        logits[..., 0] = input_ids
        logits[..., 1] = position_ids
        return logits, past

    windows = [[1, 2, 3], [4, 5, 6], [7, 0, 1]]
    logits, targets = next_token_eval(step, lambda b: [np.zeros((b, 0))], windows, batch=2)
    assert calls == [((2, 3), (2, 0)), ((1, 3), (1, 0))]
    assert logits[..., 0].tolist() == windows and logits[0, :, 1].tolist() == [0, 1, 2]
    assert targets.tolist() == [[2, 3], [5, 6], [0, 1]]
