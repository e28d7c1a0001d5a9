"""Time one dsc ONNX engine in a process of its own and report that process's memory (for bench_llamacpp.py).

    python benchmarks/engine_probe.py ENGINE.onnx --threads 2 [--context 128] [--prefill 128] [--decode 64]

Imports only numpy, onnxruntime and dsc.runtime.engine (no torch, no compiler), so the process holds the engine,
onnxruntime and a Python interpreter, nothing else. Prints one JSON object on stdout. It measures what
``llama-bench -p P -n N -d C -r R`` measures, warm, as the mean over R repetitions of tokens/s:
- prefill: P new tokens in one call on top of a C-token KV cache (llama-bench's pp test at depth C);
- decode: N one-token calls after a C-token context, greedy next token (llama-bench's tg test at depth C).
The C-token context is computed once (it is also the cold first call); every repetition starts from it.
Warm-up, untimed, as llama-bench does it: one P-token prefill and ``--warmup`` decode steps.
Cold figures, separately: session creation seconds, the first call (the C-token context from an empty cache)
and the first decode step after it.
Memory: VmRSS and VmHWM from /proc/self/status before the engine is loaded, after the session is created, and
at the end (VmHWM at the end = the peak over the process's whole life, load included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from dsc.runtime.engine import OnnxEngine


def proc_memory_bytes(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of a process from /proc/PID/status, in bytes (empty once it exited)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class Probe:
    def __init__(self, engine: OnnxEngine, vocab: int, seed: int = 0) -> None:
        self.engine = engine
        self.rng = np.random.default_rng(seed)
        self.vocab = vocab

    def ids(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.vocab, (1, n), dtype=np.int64)

    def step(self, ids: np.ndarray, start: int, past: list) -> tuple[float, np.ndarray, list]:
        pos = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]
        t = time.perf_counter()
        logits, present = self.engine.step(ids, pos, past)
        return time.perf_counter() - t, logits, present

    def decode(self, logits: np.ndarray, start: int, past: list, steps: int) -> float:
        """Seconds for ``steps`` greedy one-token calls starting at position ``start``."""
        total = 0.0
        for i in range(steps):
            nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            s, logits, past = self.step(nxt, start + i, past)
            total += s
        return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", type=Path)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    report: dict = {"memory": {"before_load": proc_memory_bytes()}}
    t = time.perf_counter()
    engine = OnnxEngine(args.engine, threads=args.threads)
    report["cold"] = {"load_s": time.perf_counter() - t}
    report["memory"]["after_load"] = proc_memory_bytes()
    probe = Probe(engine, int(engine.manifest.config["vocab_size"]))
    c = args.context
    first_s, ctx_logits, ctx_past = probe.step(probe.ids(c), 0, [cache.empty(1) for cache in engine.cache])
    report["cold"]["first_call_s"] = first_s
    report["cold"]["first_call_tokens"] = c
    report["cold"]["first_decode_step_s"] = probe.decode(ctx_logits, c, ctx_past, 1)

    probe.step(probe.ids(args.prefill), c, ctx_past)  # warm-up, untimed
    probe.decode(ctx_logits, c, ctx_past, args.warmup)
    prefill = [args.prefill / probe.step(probe.ids(args.prefill), c, ctx_past)[0] for _ in range(args.repeats)]
    decode = [args.decode / probe.decode(ctx_logits, c, ctx_past, args.decode) for _ in range(args.repeats)]
    report["prefill_tokens_per_s"] = statistics.mean(prefill)
    report["prefill_samples"] = prefill
    report["decode_tokens_per_s"] = statistics.mean(decode)
    report["decode_samples"] = decode
    report["memory"]["end"] = proc_memory_bytes()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
