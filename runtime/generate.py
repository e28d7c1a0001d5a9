"""The generation loop shared by every engine: prefill, then greedy decode through the KV cache."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from dsc.runtime.engine import Engine


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per batch row (prompt excluded)
    prefill_s: float
    decode_s: float
    steps_logits: list[np.ndarray] | None = None  # logits of the last position at each step, when kept
    prefill_logits: np.ndarray | None = None  # logits of every prompt position [batch, length, vocab], when kept

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens after the first (the first comes from prefill) per second."""
        n = sum(len(t) for t in self.tokens) - len(self.tokens)
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Greedy generation for a batch of equal-length prompts."""
    if not prompts or len({len(p) for p in prompts}) != 1 or len(prompts[0]) == 0:
        raise ValueError("prompts must be a non-empty batch of equal-length, non-empty id lists")
    batch, length = len(prompts), len(prompts[0])
    ids = np.asarray(prompts, dtype=np.int64)
    past = [c.empty(batch) for c in engine.cache]
    kept: list[np.ndarray] = []
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)

    start = time.perf_counter()
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
    logits, past = engine.step(ids, positions, past)
    prefill_s = time.perf_counter() - start
    prefill_logits = logits.copy() if keep_logits else None

    start = time.perf_counter()
    for step in range(max_new_tokens):
        last = logits[:, -1, :]
        if keep_logits:
            kept.append(last.copy())
        nxt = last.argmax(-1).astype(np.int64)
        for b in range(batch):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = eos_token_id is not None and int(nxt[b]) == eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        positions = np.full((batch, 1), length + step, dtype=np.int64)
        logits, past = engine.step(nxt[:, None], positions, past)
    decode_s = time.perf_counter() - start
    return Generation(out, prefill_s, decode_s, kept if keep_logits else None, prefill_logits)
