"""Whether this machine can build TensorRT engines, and the one-line answer when it cannot."""

from __future__ import annotations

from dsc.errors import CompileError

HINT = "pip install 'dsc[tensorrt]' on a machine with an NVIDIA GPU, or compile with -o model.onnx here"


def require_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise CompileError(f"TensorRT output needs the 'tensorrt' package, which is not installed ({HINT})") from None
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        raise CompileError(f"TensorRT output needs an NVIDIA GPU with CUDA, and none is visible ({HINT})")
