"""DeepSeek-V3.2 sparse attention (DSA): decode speed after long contexts, DSA engine vs the same weights run
dense (index_topk raised above the context, so every key is selected) vs transformers eager, bench-v32 preset.

    python benchmarks/bench_dsa.py [--contexts 1024,4096,16384] [--steps 8] [--chunk 512] [--profile]
        [--transformers-max-context 4096] [--no-transformers]
    python benchmarks/bench_dsa.py --prefill-forms [--contexts 1024,4096]   # the measurement behind SPARSE_PREFILL

Each context is reached by a real prefill in chunks of ``--chunk`` tokens through the engine's own cache (a
16K-token prefill in one call would hold 16K x 16K attention scores per head), then ``--steps`` greedy decode
steps are timed after 2 warm-up steps. All runners share one process and one checkpoint; compare the ratios.
transformers eager re-expands the whole latent cache through kv_b_proj at every step (O(T) matrix products per
token), so by default it runs only up to --transformers-max-context (16K would take most of an hour on 2 cores).
``--profile`` adds onnxruntime's profile of DSA decode steps at the largest context: the share of the indexer
(its O(T) part), of the sparse attention (O(top-k)), and of everything else (weights: O(1) in T).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import THREADS, DscRunner, HfRunner, bench_checkpoint, compile_engine, prompt_ids
from dsc.engine_format import full_mask
from dsc.ir.graph import ATTENTION_MASK
from dsc.runtime.engine import ort_session


class ChunkedDsc(DscRunner):
    def __init__(self, engine, chunk: int) -> None:
        super().__init__(engine)
        self.chunk = chunk

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self.past = [c.empty(1) for c in self.engine.cache]
        for at in range(0, len(ids), self.chunk):
            part = np.asarray([ids[at : at + self.chunk]], dtype=np.int64)
            pos = np.arange(at, at + part.shape[1])[None].copy()
            self.logits, self.past = self.engine.step(part, pos, self.past)
        self.pos = len(ids)
        return time.perf_counter() - start


class ChunkedHf(HfRunner):
    def __init__(self, ckpt: Path, chunk: int) -> None:
        super().__init__(ckpt)
        self.chunk = chunk

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self.cache = None
        for at in range(0, len(ids), self.chunk):
            kw = {} if self.cache is None else {"cache": self.cache}
            out = self.forward(torch.tensor([ids[at : at + self.chunk]]), use_cache=True, **kw)
            self.cache, self.logits = out.past_key_values, out.logits
        return time.perf_counter() - start


def dense_copy(ckpt: Path, out: Path, topk: int) -> Path:
    """The same weights with index_topk >= every context: DSA selects every key, i.e. dense MLA."""
    out.mkdir(exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, index_topk=topk)))
    return out


def prefill_forms(ckpt: Path, work: Path, contexts: list[int], chunk: int) -> None:
    """Prefill seconds of one engine per DSA prefill form (decode gathers in both), chunks of ``chunk`` tokens."""
    import dsc.backends.onnx as lowering

    runners = {}
    for form in lowering.SPARSE_FORMS:
        lowering.SPARSE_PREFILL = form
        runners[form] = ChunkedDsc(compile_engine(ckpt, work / f"dsa-prefill-{form}.onnx"), chunk)
    print(f"bench-v32 DSA prefill in chunks of {chunk}: seconds (best of 2 runs each)")
    for ctx in contexts:
        ids = prompt_ids(ctx, 8192)
        best = {form: min(r.prefill(ids) for _ in range(2)) for form, r in runners.items()}
        print(f"{ctx:>8} " + " ".join(f"{form} {sec:8.2f}s" for form, sec in best.items()), flush=True)


def profile_decode(runner: ChunkedDsc, steps: int) -> None:
    """onnxruntime's kernel times over ``steps`` decode steps from the runner's current cache, by part of DSA."""
    engine = runner.engine
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(engine.path, THREADS, profile_prefix=f"{tmp}/profile")
        outputs = ["logits"] + [c.output for c in engine.cache]
        logits, past, pos = runner.logits, [np.asarray(p) for p in runner.past], runner.pos
        for i in range(steps):
            feeds = {
                "input_ids": logits[:, -1].argmax(-1)[:, None].astype(np.int64),
                "position_ids": np.full((1, 1), pos + i, dtype=np.int64),
                ATTENTION_MASK: full_mask(np.zeros((1, 1), dtype=np.int64), past, engine.cache),
                **{c.input: p for c, p in zip(engine.cache, past, strict=True)},
            }
            logits, *past = session.run(outputs, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    parts: dict[str, float] = {"indexer (O(T))": 0.0, "sparse attention (O(top-k))": 0.0, "rest": 0.0}
    runs = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"]
            part = "indexer (O(T))" if "indexer_select" in name else "rest"
            part = "sparse attention (O(top-k))" if "sparse_attention" in name else part
            parts[part] += e["dur"] / steps
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs += e["dur"] / steps
    print(f"profile, DSA decode at context {runner.pos}: {runs / 1000:.2f} ms/token in onnxruntime, kernels:")
    for part, us in parts.items():
        print(f"    {part:30s} {us / 1000:7.2f} ms/token ({us / max(sum(parts.values()), 1e-9):5.1%})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--transformers-max-context", type=int, default=4096)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--prefill-forms", action="store_true", help="time DSA prefill with the gather and mask forms")
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsc-bench-dsa-"))
    ckpt = bench_checkpoint(work, "bench-v32")
    if args.prefill_forms:
        prefill_forms(ckpt, work, contexts, args.chunk)
        return
    dense = dense_copy(ckpt, work / "bench-v32-dense", topk=1 << 20)
    runners = {
        "dsa": ChunkedDsc(compile_engine(ckpt, work / "dsa.onnx"), args.chunk),
        "dense": ChunkedDsc(compile_engine(dense, work / "dense.onnx"), args.chunk),
    }
    if not args.no_transformers:
        runners["transformers"] = ChunkedHf(ckpt, args.chunk)
    kv = runners["dsa"].engine.manifest.kv_cache.bytes_per_token
    topk = json.loads((ckpt / "config.json").read_text())["index_topk"]
    print(f"bench-v32, fp32, index_topk {topk}, KV bytes/token (latent + indexer keys, all layers): {kv:,}")
    print(f"{'context':>8} {'engine':>13} {'prefill s':>10} {'decode tok/s':>13} {'vs dense':>9}")
    for ctx in contexts:
        results = {}
        for name, runner in runners.items():
            if name == "transformers" and ctx > args.transformers_max_context:
                continue
            prefill_s = runner.prefill(prompt_ids(ctx, 8192))
            runner.decode(2)
            results[name] = (prefill_s, args.steps / runner.decode(args.steps))
        base = results["dense"][1]
        for name, (prefill_s, tps) in results.items():
            print(f"{ctx:>8} {name:>13} {prefill_s:>10.2f} {tps:>13.1f} {tps / base:>8.2f}x", flush=True)
    if args.profile:
        profile_decode(runners["dsa"], args.steps)


if __name__ == "__main__":
    main()
