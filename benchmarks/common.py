"""Shared pieces of the benchmarks: a bench checkpoint, dsc engines and transformers eager, timed side by side."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from dsc.commands.compile import CompileOptions, compile_model
from dsc.frontends.presets import make_model
from dsc.runtime.engine import OnnxEngine

THREADS = int(os.environ.get("DSC_BENCH_THREADS", os.cpu_count() or 1))


def bench_checkpoint(workdir: Path, preset: str = "bench") -> Path:
    path = workdir / preset
    if not (path / "config.json").exists():
        make_model(preset, path, seed=0)
    return path


def compile_engine(ckpt: Path, out: Path, **options) -> OnnxEngine:
    compile_model(ckpt, out, CompileOptions(**options))
    return OnnxEngine(out, threads=THREADS)


class DscRunner:
    """Prefill then timed greedy decode steps through an ONNX engine's KV cache."""

    def __init__(self, engine: OnnxEngine) -> None:
        self.engine = engine

    def prefill(self, ids: list[int]) -> float:
        arr = np.asarray([ids], dtype=np.int64)
        start = time.perf_counter()
        self.logits, self.past = self.engine.step(
            arr, np.arange(len(ids))[None].copy(), [c.empty(1) for c in self.engine.cache]
        )
        self.pos = len(ids)
        return time.perf_counter() - start

    def decode(self, steps: int) -> float:
        """Seconds for ``steps`` greedy decode steps."""
        start = time.perf_counter()
        for _ in range(steps):
            nxt = self.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            self.logits, self.past = self.engine.step(nxt, np.full((1, 1), self.pos, dtype=np.int64), self.past)
            self.pos += 1
        return time.perf_counter() - start


class HfRunner:
    """transformers' DeepseekV3ForCausalLM in float32 on the same checkpoint: eager attention, and the
    per-expert loop for the MoE ("eager" experts; transformers 5.24's default grouped_mm is slower on CPU:
    62 vs 74 decode tok/s at context 128 on the bench preset, 2 cores)."""

    def __init__(self, ckpt: Path, compiled: bool = False, experts: str = "eager") -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(THREADS)
        self.model = AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, attn_implementation="eager", experts_implementation=experts
        ).eval()
        self.forward = torch.compile(self.model.forward, dynamic=True) if compiled else self.model.forward

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        out = self.forward(torch.tensor([ids]), use_cache=True)
        self.cache, self.logits = out.past_key_values, out.logits
        return time.perf_counter() - start

    @torch.no_grad()
    def decode(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            nxt = self.logits[:, -1].argmax(-1, keepdim=True)
            out = self.forward(nxt, cache=self.cache, use_cache=True)
            self.cache, self.logits = out.past_key_values, out.logits
        return time.perf_counter() - start


def decode_tokens_per_s(runner, prompt: list[int], steps: int, warmup: int = 2) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s after ``warmup`` untimed steps)."""
    prefill_s = runner.prefill(prompt)
    runner.decode(warmup)
    return prefill_s, steps / runner.decode(steps)


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_with_peak_memory(
    cmd: list[str], stdout: Path, stderr: Path, env: dict[str, str] | None = None, interval_s: float = 0.02
) -> tuple[int, float, dict[str, int]]:
    """Run ``cmd`` with stdout/stderr to files; return (exit code, wall seconds, memory). Memory: the child's
    /proc/PID/status sampled every ``interval_s`` while it runs, the largest value seen of each of VmRSS, VmHWM,
    RssAnon and RssFile, in bytes. VmHWM is the kernel's own high-water mark of the child's address space (the
    one exec gave it), so the last sample holds the peak up to ``interval_s`` before exit. Not ru_maxrss from
    wait4: Linux carries that across fork and exec, so a child of a big parent could report the parent's size."""
    from engine_probe import proc_memory_bytes  # torch-free, shared with the child that times dsc engines

    peak: dict[str, int] = {}
    start = time.perf_counter()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        while proc.poll() is None:
            for key, value in proc_memory_bytes(proc.pid).items():
                peak[key] = max(peak.get(key, 0), value)
            time.sleep(interval_s)
    return proc.returncode, time.perf_counter() - start, peak
