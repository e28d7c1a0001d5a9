"""Bind a checkpoint to the traced model: lazy weight sources checked against the config's shapes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from dsc.frontends.checkpoint import Checkpoint
from dsc.frontends.trace import WeightProvider, trace_model
from dsc.ir.graph import Graph
from dsc.ir.types import DType


@dataclass(frozen=True)
class CheckpointTensor:
    """A checkpoint tensor read when a backend writes it: as stored (``raw``), or as float32 (FP8 ones
    dequantized with their block scales)."""

    checkpoint: Checkpoint
    key: str
    raw: bool = False

    def load(self) -> torch.Tensor:
        if self.raw:
            return self.checkpoint.load(self.key)
        return self.checkpoint.load_float(self.key, torch.float32)

    def describe(self) -> str:
        info = self.checkpoint.info(self.key)
        kind = "dequant_fp8 " if self.checkpoint.is_fp8(self.key) and not self.raw else ""
        return f"{kind}{info.file.name}[{self.key}]"


def weight_provider(checkpoint: Checkpoint, keep_fp8: bool = True) -> WeightProvider:
    """Sources for the tracer. FP8 weights stay FP8 with their scales unless ``keep_fp8`` is off; every other
    tensor (bf16, fp16, fp32) is read as float32."""

    def provide(key: str, shape: tuple[int, ...]) -> tuple:
        checkpoint.expect(key, shape)
        if keep_fp8 and checkpoint.is_fp8(key):
            scale = CheckpointTensor(checkpoint, key + "_scale_inv", raw=True)
            return DType.F8E4M3, CheckpointTensor(checkpoint, key, raw=True), scale
        return DType.F32, CheckpointTensor(checkpoint, key)

    return provide


def load_graph(path: str | Path, *, keep_fp8: bool = True) -> tuple[Checkpoint, Graph]:
    """Open a checkpoint (file, directory or index) and trace it into the IR (float32, and FP8 where the
    checkpoint stores FP8 and ``keep_fp8`` is on)."""
    return trace_checkpoint(Checkpoint.open(path), keep_fp8=keep_fp8)


def trace_checkpoint(checkpoint: Checkpoint, *, keep_fp8: bool = True) -> tuple[Checkpoint, Graph]:
    """``load_graph`` for a checkpoint already open (its config read, e.g. to check inputs before tracing)."""
    provider = weight_provider(checkpoint, keep_fp8)
    graph = trace_model(checkpoint.config, provider, name=checkpoint.config.model_type)
    graph.meta["skipped_keys"] = list(checkpoint.skipped_keys)
    graph.meta["tokenizer_path"] = checkpoint.tokenizer_path
    graph.meta["special_tokens"] = checkpoint.special_tokens()
    return checkpoint, graph
