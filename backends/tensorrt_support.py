"""Whether this machine can build TensorRT engines, and the one-line answer when it cannot."""

from __future__ import annotations

import logging

from dsc.errors import CompileError

log = logging.getLogger("dsc")

HINT = "pip install 'dsc[tensorrt]' on a machine with an NVIDIA GPU, or compile with -o model.onnx here"
# TensorRT versions dsc supports: 10.13 (FP8 block dequantization) through 11.x, the two whose Python API is checked
# name by name (tests/backends/test_tensorrt_api.py); pyproject's `tensorrt` extra pins the same range. 10.0-10.12
# still build (strongly typed networks exist there) with every FP8 weight dequantized, untested; 9.x and 12+ not.
TESTED = ((10, 13), (12, 0))
BUILDS = ((10, 0), (12, 0))


def check_tensorrt_version(version: str, error: type[Exception] = CompileError) -> tuple[int, int]:
    """``version`` (tensorrt.__version__) as (major, minor); ``error`` naming it when dsc cannot use it."""
    from dsc.backends.tensorrt_types import parse_tensorrt_version

    try:
        have = parse_tensorrt_version(version)
    except ValueError:
        raise error(f"TensorRT reports an unreadable version {version!r}") from None
    if not BUILDS[0] <= have < BUILDS[1]:
        raise error(
            f"TensorRT {version} is not supported: dsc builds and runs plans with TensorRT 10.13 to 11.x "
            "(pip install 'tensorrt>=10.13,<12')"
        )
    if have < TESTED[0]:
        log.warning(
            f"      TensorRT {version} is older than 10.13, the oldest version dsc is checked against: it has no FP8 "
            "block dequantization, so FP8 weights are dequantized at compile time"
        )
    return have


def require_tensorrt() -> None:
    try:
        import tensorrt
    except ImportError:
        raise CompileError(f"TensorRT output needs the 'tensorrt' package, which is not installed ({HINT})") from None
    check_tensorrt_version(tensorrt.__version__)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        raise CompileError(f"TensorRT output needs an NVIDIA GPU with CUDA, and none is visible ({HINT})")
