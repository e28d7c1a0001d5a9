"""Bind a checkpoint to the traced model: lazy weight sources checked against the config's shapes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from dsc.frontends.checkpoint import Checkpoint
from dsc.frontends.trace import WeightProvider, trace_model
from dsc.ir.graph import Graph, WeightSource
from dsc.ir.types import DType


@dataclass(frozen=True)
class CheckpointTensor:
    """A checkpoint tensor read when a backend writes it; FP8 ones are dequantized with their block scales."""

    checkpoint: Checkpoint
    key: str

    def load(self) -> torch.Tensor:
        return self.checkpoint.load_float(self.key, torch.float32)

    def describe(self) -> str:
        info = self.checkpoint.info(self.key)
        kind = "dequant_fp8 " if self.checkpoint.is_fp8(self.key) else ""
        return f"{kind}{info.file.name}[{self.key}]"


def weight_provider(checkpoint: Checkpoint) -> WeightProvider:
    def provide(key: str, shape: tuple[int, ...]) -> tuple[DType, WeightSource]:
        checkpoint.expect(key, shape)
        return DType.F32, CheckpointTensor(checkpoint, key)

    return provide


def load_graph(path: str | Path) -> tuple[Checkpoint, Graph]:
    """Open a checkpoint (file, directory or index) and trace it into an fp32 IR graph."""
    checkpoint = Checkpoint.open(path)
    graph = trace_model(checkpoint.config, weight_provider(checkpoint), name=checkpoint.config.model_type)
    graph.meta["skipped_keys"] = list(checkpoint.skipped_keys)
    return checkpoint, graph
