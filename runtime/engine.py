"""Engines the runtime can drive: one ``step`` call = one forward over new tokens with the KV cache.

Every engine kind (ONNX via onnxruntime, TensorRT) exposes the same interface so that one generation
loop (runtime/generate.py) serves all of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
from dsc.engine_format import CacheTensor, Manifest, check_files, folder_engine, full_mask, read_manifest
from dsc.errors import EngineError
from dsc.ir.graph import ATTENTION_MASK


class Engine(Protocol):
    manifest: Manifest
    cache: tuple[CacheTensor, ...]

    def step(
        self, input_ids: np.ndarray, position_ids: np.ndarray, past: list, attention_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, list]:
        """Run new tokens through the model. Returns (logits [b, s, vocab], present cache tensors). ``past`` is the
        previous step's present (or ``[c.empty(batch) for c in cache]``); engines may return the present as their
        own array type (onnxruntime OrtValues, torch tensors) as long as ``np.asarray`` reads it and ``step``
        takes it back as past. ``attention_mask`` [b, past+seq] (1 = token, 0 = padding): all ones when None."""
        ...


def ort_session(
    path: Path, threads: int | None = None, providers: list[str] | None = None, *, profile_prefix: str | None = None
):
    """An onnxruntime session for one dsc ONNX file (whole engines and expert-parallel pieces alike);
    ``profile_prefix`` turns on onnxruntime's profiler (benchmarks/bench_decode.py --profile)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 16)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime keeps DequantizeLinear nodes out of constant folding (for its int8 QDQ fusions), which
    # would dequantize every FP8 weight on every step: 7 vs 227 decode tok/s on the bench preset. dsc emits
    # no QDQ activations, so fold the weights once at load instead (CPU has no FP8 GEMM to keep them for).
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    # Parallel loops hand out work in blocks that shrink toward this base (onnxruntime's dynamic block
    # scheduling) instead of one static split: decode GEMVs finish together on both cores. Measured on the bench
    # preset at 2 threads, interleaved in one process, best of 4-8 runs: float32 121 -> 142 and 124 -> 125 tok/s,
    # int8 329 -> 355, int4 533 -> 706 and 394 -> 495.
    opts.add_session_config_entry("session.dynamic_block_base", "4")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt models
        raise EngineError(f"{path}: onnxruntime cannot load the engine: {str(exc).splitlines()[0]}") from exc


# QMoE's router_weights input (int8/int4 experts routed by DeepSeek's rule) first loads in onnxruntime 1.31
# (1.23.1 through 1.30 reject the model); float32 and FP8 engines need the CPU MoE kernel of 1.23.1.
MIN_ONNXRUNTIME = {"int8": (1, 31), "int4": (1, 31), None: (1, 23, 1), "fp8": (1, 23, 1)}


def onnxruntime_version() -> tuple[int, ...]:
    """The installed onnxruntime's version as numbers ("1.32.0" -> (1, 32, 0)), for comparisons with tuples."""
    import onnxruntime as ort

    return tuple(int(p) for p in ort.__version__.split(".")[:3] if p.isdigit())


def check_onnxruntime(manifest: Manifest, path: Path) -> None:
    import onnxruntime as ort

    have = onnxruntime_version()
    need = MIN_ONNXRUNTIME.get(manifest.quantized, MIN_ONNXRUNTIME[None])
    if have < need:
        raise EngineError(
            f"{path}: this {manifest.quantized or 'float'} engine needs onnxruntime >= {'.'.join(map(str, need))} "
            f"(installed: {ort.__version__}); pip install -U onnxruntime"
        )


# onnxruntime-gpu's CUDA MoE kernel ignored activation_alpha / beta / swiglu_limit (a hard-coded GPT-OSS SwiGLU)
# before about 1.28 (microsoft/onnxruntime#28738): dsc's experts would run silently wrong there.
MIN_CUDA_ONNXRUNTIME = (1, 28)
DEVICES = ("cpu", "cuda")


def providers_for(device: str) -> list[str]:
    """onnxruntime execution providers for ``--device``; a CUDA request that cannot be honoured is an error, never
    a silent fall back to the CPU."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise EngineError(f"--device must be one of {', '.join(DEVICES)}, not '{device}'")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise EngineError(
            f"--device cuda: onnxruntime {ort.__version__} has no CUDA execution provider (install onnxruntime-gpu "
            "instead of onnxruntime: with both installed, the CPU package hides the CUDA provider)"
        )
    if onnxruntime_version() < MIN_CUDA_ONNXRUNTIME:
        raise EngineError(
            f"--device cuda: onnxruntime-gpu {ort.__version__}'s MoE kernel ignores the SwiGLU attributes dsc sets "
            f"(fixed in {'.'.join(map(str, MIN_CUDA_ONNXRUNTIME))}); pip install -U onnxruntime-gpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxEngine:
    """An ONNX engine run by onnxruntime (CPU by default; CUDA when onnxruntime-gpu is installed and asked).

    ``step`` runs through onnxruntime's IO binding: the present cache comes back as onnxruntime ``OrtValue``s that
    onnxruntime allocated itself (on the GPU under the CUDA provider, ``cache_device``), and fed back as the next
    step's past they are bound as they are, so the cache never goes through numpy or the host between steps
    (``np.asarray(value)`` reads a CPU one without a copy; ``value.numpy()`` copies a CUDA one). numpy arrays are
    accepted as past too (the empty cache, a cache from another engine)."""

    def __init__(self, path: Path, *, threads: int | None = None, providers: list[str] | None = None) -> None:
        self.path = path
        self.manifest = read_manifest(path)
        check_files(self.manifest, path)
        self.cache = self.manifest.cache
        check_onnxruntime(self.manifest, path)
        self.session = ort_session(path, threads, providers)
        self._outputs = ["logits"] + [c.output for c in self.cache]
        # With the CUDA provider the present cache is allocated on the GPU and bound back as the next past there:
        # a decode step moves only ids in and logits out, never the cache (onnxruntime-gpu's IO binding).
        self.cache_device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def step(
        self, input_ids: np.ndarray, position_ids: np.ndarray, past: list, attention_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, list]:
        import onnxruntime as ort

        if attention_mask is None:
            attention_mask = full_mask(input_ids, past, self.cache)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        for c, p in zip(self.cache, past, strict=True):
            if isinstance(p, ort.OrtValue):
                binding.bind_ortvalue_input(c.input, p)
            else:
                binding.bind_cpu_input(c.input, np.ascontiguousarray(p))
        binding.bind_output("logits")  # host memory: the sampler reads it
        for c in self.cache:
            binding.bind_output(c.output, self.cache_device)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present


def load_engine(path: str | Path, *, threads: int | None = None, device: str = "cpu") -> Engine:
    path = folder_engine(Path(path))
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxEngine(path, threads=threads, providers=providers_for(device))
    if suffix in (".plan", ".engine"):
        from dsc.runtime.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(path)
    raise EngineError(f"{path}: unknown engine type '{suffix}' (expected .onnx, .plan or .engine)")
