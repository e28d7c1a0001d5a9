"""What expert fusion and FP8 quantization buy on the bench preset, side by side in one process.

    python benchmarks/bench_passes.py [--prompt 128] [--steps 32] [--workdir DIR]

For each engine: file size, load time (onnxruntime session creation), prefill latency of a --prompt-token
prompt and greedy decode tokens/s over --steps steps; transformers eager on the same checkpoint last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import THREADS, DscRunner, HfRunner, bench_checkpoint, decode_tokens_per_s, prompt_ids
from dsc.commands.compile import CompileOptions, compile_model
from dsc.runtime.engine import OnnxEngine

VARIANTS = {
    "fp32-unfused": CompileOptions(disable_passes=("expert-fusion",)),
    "fused": CompileOptions(),
    "fused+fp8": CompileOptions(quantize="fp8"),
    "fused-gather": CompileOptions(moe_lowering="gather"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsc-bench-"))
    ckpt = bench_checkpoint(work)
    prompt = prompt_ids(args.prompt, 8192)
    rows = []
    for name, options in VARIANTS.items():
        out = work / f"{name}.onnx"
        compile_model(ckpt, out, options)
        size = sum(f.stat().st_size for f in out.parent.glob(out.name + "*"))
        start = time.perf_counter()
        engine = OnnxEngine(out, threads=THREADS)
        load_s = time.perf_counter() - start
        prefill_s, tps = decode_tokens_per_s(DscRunner(engine), prompt, args.steps)
        rows.append((name, size, load_s, prefill_s, tps))
        del engine
    start = time.perf_counter()
    hf = HfRunner(ckpt)
    load_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    prefill_s, tps = decode_tokens_per_s(hf, prompt, args.steps)
    rows.append(("transformers", size, load_s, prefill_s, tps))
    base_tps, fp32_size = rows[-1][4], rows[0][1]
    print(f"bench preset, {THREADS} threads, prompt {args.prompt} tokens, {args.steps} decode steps")
    print(
        f"{'engine':>14} {'size MB':>8} {'vs fp32':>8} {'load s':>7} {'prefill s':>10} {'decode tok/s':>13} "
        f"{'vs transformers':>16}"
    )
    for name, size, load_s, prefill_s, tps in rows:
        print(
            f"{name:>14} {size / 2**20:>8.1f} {size / fp32_size:>8.3f} {load_s:>7.2f} {prefill_s:>10.3f} "
            f"{tps:>13.1f} {tps / base_tps:>15.2f}x"
        )


if __name__ == "__main__":
    main()
