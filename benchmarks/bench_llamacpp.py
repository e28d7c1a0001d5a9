"""dsc's engine against llama.cpp (the strongest CPU peer, DESIGN.md §7) on the same bench checkpoint, f32.

    python benchmarks/bench_llamacpp.py --gguf bench-f32.gguf --checkpoint DIR [--prompt 128] [--steps 64]

Needs llama-cpp-python (it builds llama.cpp from source: `pip install llama-cpp-python`) and a GGUF made from
the same checkpoint with llama.cpp's own converter (convert_hf_to_gguf.py --outtype f32, shipped in
llama-cpp-python's sdist under vendor/llama.cpp). The converter wants a tokenizer beside the weights: the bench
preset has none, so train any 8192-token byte-level BPE with `tokenizers` and save tokenizer.json there; its
pre-tokenizer hash is unknown to the converter, so make `get_vocab_base_pre` return "default" for the run.
Both engines decode greedily with the same thread count; compare the ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import THREADS, DscRunner, bench_checkpoint, compile_engine, decode_tokens_per_s, prompt_ids


class LlamaCppRunner:
    def __init__(self, gguf: Path, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=n_ctx, n_batch=512, verbose=False
        )

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - start

    def decode(self, steps: int) -> float:
        start = time.perf_counter()
        self.tokens = []
        for _ in range(steps):
            self.tokens.append(self.llm.sample(top_k=1, temp=0.0))
            self.llm.eval([self.tokens[-1]])
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, help="the bench checkpoint the GGUF was made from (default: make it)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dsc-bench"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint or bench_checkpoint(args.workdir)
    prompt = prompt_ids(args.prompt, 8192)
    rows = {
        "dsc (onnxruntime)": DscRunner(compile_engine(ckpt, args.workdir / "llamacmp.onnx")),
        "llama.cpp f32": LlamaCppRunner(args.gguf, n_ctx=args.prompt + args.steps + 16),
    }
    print(f"bench preset, f32, {THREADS} threads, prompt {args.prompt} tokens, {args.steps} decode steps")
    results = {name: decode_tokens_per_s(r, prompt, args.steps) for name, r in rows.items()}
    base = results["llama.cpp f32"][1]
    for name, (prefill_s, tps) in results.items():
        print(f"{name:>18}  prefill {prefill_s * 1000:8.1f} ms  decode {tps:7.1f} tok/s  {tps / base:5.2f}x llama.cpp")
    # Same greedy tokens? (a check that both run the same model, not a numerical test)
    dsc_engine = rows["dsc (onnxruntime)"].engine
    from dsc.runtime.generate import generate

    ours = generate(dsc_engine, [prompt], 16).tokens[0]
    rows["llama.cpp f32"].prefill(prompt)
    rows["llama.cpp f32"].decode(16)
    theirs = rows["llama.cpp f32"].tokens
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"first 16 greedy tokens identical: {same}/16")


if __name__ == "__main__":
    main()
