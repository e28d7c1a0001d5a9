"""A TensorRT plan run through the Engine interface (runtime/engine.py), so runtime/generate.py drives it as
it drives ONNX engines.

Buffers are torch tensors on the GPU. The KV cache stays there between steps: ``step`` returns the present
cache as torch CUDA tensors and takes them back as ``past``; numpy arrays (the empty cache generate.py starts
from, or a caller's own) are copied in. Logits come back as numpy.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
from dsc.engine_format import full_mask, read_manifest
from dsc.errors import EngineError
from dsc.ir.graph import ATTENTION_MASK

_HINT = "pip install 'dsc[tensorrt]' on a machine with an NVIDIA GPU, or compile with -o model.onnx to run here"
_ALIGN = 256  # TensorRT wants every tensor address 256-byte aligned


def _torch_dtypes(trt) -> dict[Any, Any]:
    import torch

    return {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.int8: torch.int8,
        trt.uint8: torch.uint8,
        trt.bool: torch.bool,
    }


class TensorRTEngine:
    """A ``.plan`` / ``.engine`` file built by backends/tensorrt.build_engine, with its manifest beside it.

    ``device`` is the torch device of every buffer ("cuda" or "cuda:N"); tests that stand a fake runtime in
    for TensorRT use "cpu".
    """

    def __init__(self, path: str | Path, *, device: str = "cuda") -> None:
        import torch

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.cache = self.manifest.cache
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError(f"{self.path}: TensorRT engines need the 'tensorrt' package ({_HINT})") from None
        from dsc.backends.tensorrt_support import check_tensorrt_version

        check_tensorrt_version(trt.__version__, EngineError)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"{self.path}: TensorRT engines need an NVIDIA GPU with CUDA, and none is visible")
        built = (self.manifest.tensorrt or {}).get("version", "unknown")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise EngineError(
                f"{self.path}: TensorRT {trt.__version__} cannot load this plan (built with TensorRT {built}; plans "
                "only load on the TensorRT version and GPU kind that built them)"
            )
        info = self.manifest.tensorrt or {}
        shapes = info.get("profile_shapes", {})
        self._profiles = [p for p in ("decode", "prefill") if p in shapes]
        if not self._profiles:
            raise EngineError(
                f"{self.path}: the manifest has no decode profile (a plan from an older dsc: recompile it)"
            )
        self._chunk = int(info.get("profiles", {}).get("prefill_chunk", 1))
        self._limits = {
            p: {name: (tuple(lo), tuple(hi)) for name, (lo, _, hi) in shapes[p].items()} for p in self._profiles
        }
        self._version = trt.__version__
        self._trt = trt
        self._contexts: dict[str, Any] = {}
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        expected_in = {"input_ids", "position_ids", ATTENTION_MASK, *(c.input for c in self.cache)}
        expected_out = {"logits", *(c.output for c in self.cache)}
        if set(self._inputs) != expected_in or set(self._outputs) != expected_out:
            raise EngineError(f"{self.path}: the plan's inputs/outputs do not match its manifest")
        dtypes = _torch_dtypes(trt)
        self._dtypes = {n: dtypes[self._engine.get_tensor_dtype(n)] for n in names}
        # TensorRT needs a non-null address for every input, empty ones (past length 0) included.
        self._empty = torch.empty(_ALIGN, dtype=torch.uint8, device=self.device)
        self._stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    def _address(self, t) -> int:
        return t.data_ptr() if t.numel() else self._empty.data_ptr()

    def _to_device(self, name: str, x):
        import torch

        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        t = t.to(device=self.device, dtype=self._dtypes[name]).contiguous()
        if t.numel() and t.data_ptr() % _ALIGN:
            t = t.clone()  # a view into a bigger buffer; the caching allocator aligns fresh blocks
        return t

    def _context(self, profile: str):
        """The execution context of one profile, made on first use: each allocates activation memory for its own
        profile only (ON_PROFILE_CHANGE, where the TensorRT version has it) instead of every context the maximum
        over all profiles."""
        if profile in self._contexts:
            return self._contexts[profile]
        trt = self._trt
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "ON_PROFILE_CHANGE", None)
        ctx = (
            self._engine.create_execution_context(strategy)
            if strategy is not None
            else self._engine.create_execution_context()
        )
        if ctx is None:
            raise EngineError(
                f"{self.path}: TensorRT {self._version} could not create an execution context for the {profile} "
                "profile (out of device memory for its activations? its log above says why)"
            )
        index = self._profiles.index(profile)
        handle = self._stream.cuda_stream if self._stream is not None else 0
        if not ctx.set_optimization_profile_async(index, handle):
            raise EngineError(f"{self.path}: TensorRT {self._version} refused optimization profile {index} ({profile})")
        self._contexts[profile] = ctx
        return ctx

    def _check_shape(self, profile: str, name: str, shape: tuple[int, ...]) -> None:
        if name not in self._limits[profile]:
            return
        lo, hi = self._limits[profile][name]
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
            raise EngineError(
                f"{self.path}: input {name} of shape {list(shape)} is outside the engine's {profile} profile "
                f"{list(lo)}..{list(hi)} (dsc compile --max-batch / --max-seq-len set it)"
            )

    def step(self, input_ids, position_ids, past: list, attention_mask=None) -> tuple[np.ndarray, list]:
        """One forward over new tokens. ``past``: numpy arrays or torch tensors (on any device); returns
        (logits [b, s, vocab] numpy, present cache as torch tensors on the engine's device). One token runs on the
        decode profile; more run on the prefill profile, in chunks of at most the plan's prefill chunk."""
        if len(past) != len(self.cache):
            raise EngineError(f"{self.path}: expected {len(self.cache)} cache tensors, got {len(past)}")
        seq = np.shape(input_ids)[1]
        if attention_mask is None:
            attention_mask = full_mask(input_ids, past, self.cache)
        if seq == 1:
            return self._run("decode", input_ids, position_ids, past, attention_mask)
        profile, chunk = ("prefill", self._chunk) if "prefill" in self._profiles else ("decode", 1)
        seen = np.shape(attention_mask)[1] - seq  # the mask covers past + seq; each chunk sees its prefix
        pieces = []
        for start in range(0, seq, chunk):
            end = min(start + chunk, seq)
            mask = attention_mask[:, : seen + end]
            logits, past = self._run(profile, input_ids[:, start:end], position_ids[:, start:end], past, mask)
            pieces.append(logits)
        return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)), past

    def _run(self, profile: str, input_ids, position_ids, past: list, attention_mask) -> tuple[np.ndarray, list]:
        import torch

        stream = self._stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # past may come from the caller's stream
        ctx = self._context(profile)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            feeds = {"input_ids": input_ids, "position_ids": position_ids, ATTENTION_MASK: attention_mask}
            feeds.update({c.input: p for c, p in zip(self.cache, past, strict=True)})
            buffers = {}
            for name, value in feeds.items():
                t = self._to_device(name, value)
                self._check_shape(profile, name, tuple(t.shape))
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise EngineError(f"{self.path}: TensorRT refused shape {list(t.shape)} for input {name}")
                self._bind(ctx, name, t)
                buffers[name] = t
            for name in self._outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"{self.path}: output {name} has unresolved shape {list(shape)}")
                t = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                self._bind(ctx, name, t)
                buffers[name] = t
            handle = stream.cuda_stream if stream is not None else 0
            if not ctx.execute_async_v3(handle):
                raise EngineError(f"{self.path}: TensorRT {self._version} failed to run the step")
            logits = buffers["logits"].to("cpu", torch.float32)
        if stream is not None:
            stream.synchronize()  # the inputs in ``buffers`` must outlive the step
        return logits.numpy(), [buffers[c.output] for c in self.cache]

    def _bind(self, ctx, name: str, t) -> None:
        if not ctx.set_tensor_address(name, self._address(t)):
            raise EngineError(f"{self.path}: TensorRT refused the buffer address of {name}")
