"""The generation loop shared by every engine: prefill, then decode through the KV cache, greedy or sampled.

Prompts of different lengths run as one padded batch: right padding (each row's prompt first, padding after it;
onnxruntime-genai's way) or left padding. Padding has attention_mask 0, so no real token ever attends to it; each
row's positions count only its own tokens, so a row's tokens equal what its prompt gives alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from dsc.runtime.engine import Engine

PADDING_SIDES = ("right", "left")


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per batch row (prompt excluded)
    prefill_s: float
    decode_s: float
    steps_logits: list[np.ndarray] | None = None  # logits each row's next token was drawn from, per step, when kept
    prefill_logits: np.ndarray | None = None  # logits of every (padded) prompt position [batch, length, vocab]

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens after the first (the first comes from prefill) per second."""
        n = sum(len(t) for t in self.tokens) - len(self.tokens)
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature is 0; else softmax(logits / temperature) restricted to
    the top_k most likely tokens (0: all) and to the smallest set whose probability reaches top_p, drawn from a
    generator seeded with ``seed`` (None: fresh entropy), so a seed repeats its tokens."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """The next token of each row of ``logits`` [batch, vocab]."""
    if sampling.temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    out = np.empty(len(logits), dtype=np.int64)
    for b, row in enumerate(logits.astype(np.float64) / sampling.temperature):
        order = np.argsort(-row, kind="stable")
        if sampling.top_k:
            order = order[: sampling.top_k]
        p = np.exp(row[order] - row[order[0]])
        p /= p.sum()
        if sampling.top_p < 1:  # keep the smallest prefix whose mass reaches top_p (at least one token)
            p = p[: int(np.searchsorted(np.cumsum(p), sampling.top_p)) + 1]
            p /= p.sum()
        out[b] = order[rng.choice(len(p), p=p)]
    return out


def pad_batch(prompts: Sequence[Sequence[int]], side: str = "right") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids), each [batch, longest prompt], for prompts of any lengths."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side must be one of {', '.join(PADDING_SIDES)}, not '{side}'")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty batch of non-empty id lists")
    longest = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    positions = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        at = slice(0, len(p)) if side == "right" else slice(longest - len(p), longest)
        ids[b, at], mask[b, at], positions[b, at] = p, 1, np.arange(len(p))
    return ids, mask, positions


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    keep_logits: bool = False,
    padding: str = "right",
    sampling: Sampling = GREEDY,
    on_token: Callable[[int, int], None] | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` per prompt (a row stops at ``eos_token_id``, which it keeps); prompts may
    differ in length (``padding`` side). ``on_token(row, token)`` sees each token as it is chosen (streaming)."""
    ids, mask, positions = pad_batch(prompts, padding)
    batch = len(prompts)
    lengths = np.asarray([len(p) for p in prompts], dtype=np.int64)
    last = lengths - 1 if padding == "right" else np.full(batch, ids.shape[1] - 1)
    rng = np.random.default_rng(sampling.seed)
    past = [c.empty(batch) for c in engine.cache]
    kept: list[np.ndarray] = []
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)

    start = time.perf_counter()
    logits, past = engine.step(ids, positions, past, mask)
    prefill_s = time.perf_counter() - start
    prefill_logits = logits.copy() if keep_logits else None
    rows = logits[np.arange(batch), last]

    start = time.perf_counter()
    for step in range(max_new_tokens):
        if keep_logits:
            kept.append(rows.copy())
        nxt = choose(rows, sampling, rng)
        for b in range(batch):
            if not done[b]:
                out[b].append(int(nxt[b]))
                if on_token is not None:
                    on_token(b, int(nxt[b]))
                done[b] = eos_token_id is not None and int(nxt[b]) == eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        logits, past = engine.step(nxt[:, None], (lengths + step)[:, None], past, mask)
        rows = logits[:, -1]
    decode_s = time.perf_counter() - start
    return Generation(out, prefill_s, decode_s, kept if keep_logits else None, prefill_logits)
