"""Decode cost per token of compiled ONNX engines: tok/s after a prefill of each context, and where the time goes.

    python benchmarks/bench_decode.py a.onnx b.onnx --contexts 128,1024 --repeats 5 [--profile]

Engines and contexts are interleaved repeat by repeat, so load from other processes hits every engine alike; it
prints the best and median tok/s and the least CPU ms per token (``time.process_time``, which other processes do not
inflate; with more than one thread it counts spinning too). ``--profile`` adds onnxruntime's profile of decode
steps at the first context (prefill runs in a separate session): each kernel's median over the steps, summed per
op type, with the share outside MatMul / MoE.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import THREADS, DscRunner, prompt_ids  # noqa: E402
from dsc.engine_format import full_mask
from dsc.ir.graph import ATTENTION_MASK
from dsc.runtime.engine import OnnxEngine, ort_session  # noqa: E402

GEMM_OPS = {"MatMul", "FusedMatMul", "Gemm", "MoE", "QMoE", "MatMulNBits"}


def measure(engines: dict[str, OnnxEngine], contexts: list[int], repeats: int, steps: int) -> None:
    rates: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    cpu_ms: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    for r in range(repeats):
        for ctx in contexts:
            for name, engine in engines.items():
                run = DscRunner(engine)
                run.prefill(prompt_ids(ctx, engine.manifest.vocab_size, seed=r))
                run.decode(3)
                cpu = time.process_time()
                rates[(name, ctx)].append(steps / run.decode(steps))
                cpu_ms[(name, ctx)].append((time.process_time() - cpu) / steps * 1000)
    for ctx in contexts:
        for name in engines:
            v = rates[(name, ctx)]
            print(
                f"ctx {ctx:5d}  {name:28s} decode tok/s best {max(v):7.1f} median {statistics.median(v):7.1f}"
                f"   cpu ms/token min {min(cpu_ms[(name, ctx)]):6.3f}"
            )


def profile(engine: OnnxEngine, ctx: int, steps: int, nodes: str | None = None) -> None:
    ids = np.asarray([prompt_ids(ctx, engine.manifest.vocab_size)], dtype=np.int64)
    logits, past = engine.step(ids, np.arange(ctx)[None].copy(), [c.empty(1) for c in engine.cache])
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(engine.path, THREADS, profile_prefix=f"{tmp}/profile")
        outputs = ["logits"] + [c.output for c in engine.cache]
        for i in range(steps):
            feeds = {
                "input_ids": logits[:, -1].argmax(-1)[:, None].astype(np.int64),
                "position_ids": np.full((1, 1), ctx + i, dtype=np.int64),
                ATTENTION_MASK: full_mask(np.zeros((1, 1), dtype=np.int64), past, engine.cache),
                **{c.input: np.asarray(p) for c, p in zip(engine.cache, past, strict=True)},
            }
            logits, *past = session.run(outputs, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    # Per kernel the median over the steps (other processes' load shows up as outliers), summed per op type.
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    runs: list[float] = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"])
            op_of[e["name"]] = e["args"]["op_name"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs.append(e["dur"])
    by_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for name, durations in per_node.items():
        by_op[op_of[name]] += statistics.median(durations)
        count[op_of[name]] += 1
    kernels = sum(by_op.values())
    outside = sum(v for k, v in by_op.items() if k not in GEMM_OPS)
    run_us = statistics.median(runs)
    print(
        f"{engine.path.name} ctx {ctx} (medians over {steps} steps): run {run_us / 1000:.3f} ms/token, "
        f"kernels {kernels / 1000:.3f}, outside MatMul/MoE {outside / 1000:.3f}, "
        f"between kernels {(run_us - kernels) / 1000:.3f}; {sum(count.values())} kernels/token"
    )
    for op, us in by_op.most_common():
        print(f"    {op:30s} {us:8.1f} us/token  x{count[op]}")
    if nodes:
        matching = {n: statistics.median(d) for n, d in per_node.items() if nodes in n}
        print(f"  kernels named *{nodes}*: {sum(matching.values()):.1f} us/token over {len(matching)} kernels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engines", nargs="+", type=Path)
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--nodes", help="with --profile: also sum the kernels whose name contains this (say 'rope')")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    engines = {str(p): OnnxEngine(p, threads=THREADS) for p in args.engines}
    print(f"{THREADS} threads (DSC_BENCH_THREADS)")
    measure(engines, contexts, args.repeats, args.steps)
    if args.profile:
        for engine in engines.values():
            profile(engine, contexts[0], args.steps, args.nodes)


if __name__ == "__main__":
    main()
