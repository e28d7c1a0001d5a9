"""Decode speed of the absorbed (latent-cache) engine vs the naive engine vs transformers eager, bench preset.

    python benchmarks/bench_mla.py [--contexts 128,1024,4096] [--steps 16] [--workdir DIR]

Each context is reached by a real prefill of that many tokens, then ``--steps`` greedy decode steps are
timed (after 2 warm-up steps). All three run in one process on the same checkpoint; compare the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import DscRunner, HfRunner, bench_checkpoint, compile_engine, decode_tokens_per_s, prompt_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="128,1024,4096")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsc-bench-"))
    ckpt = bench_checkpoint(work)
    runners = {
        "absorbed": DscRunner(compile_engine(ckpt, work / "absorbed.onnx")),
        "naive": DscRunner(compile_engine(ckpt, work / "naive.onnx", disable_passes=("mla-absorb",))),
        "transformers": HfRunner(ckpt),
    }
    kv = {
        name: r.engine.manifest["kv_cache"]["bytes_per_token"] for name, r in runners.items() if name != "transformers"
    }
    print(f"bench preset, fp32, KV bytes/token: absorbed {kv['absorbed']:,}, naive {kv['naive']:,}")
    print(f"{'context':>8} {'engine':>13} {'prefill s':>10} {'decode tok/s':>13} {'vs transformers':>16}")
    for ctx in contexts:
        results = {}
        for name, runner in runners.items():
            results[name] = decode_tokens_per_s(runner, prompt_ids(ctx, 8192), args.steps)
        base = results["transformers"][1]
        for name, (prefill_s, tps) in results.items():
            print(f"{ctx:>8} {name:>13} {prefill_s:>10.3f} {tps:>13.1f} {tps / base:>15.2f}x")
        a, n = results["absorbed"][1], results["naive"][1]
        print(f"{ctx:>8} absorbed/naive decode ratio {a / n:.2f}x", flush=True)


if __name__ == "__main__":
    main()
