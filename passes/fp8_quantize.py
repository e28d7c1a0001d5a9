"""FP8 block quantization of linear weights in DeepSeek's format (DESIGN.md §5).

Each float32 weight of a ``linear`` becomes float8_e4m3fn values plus float32 scales, one per 128x128 tile
(``[ceil(out/128), ceil(in/128)]``, scale = amax(tile) / 448), exactly the layout of DeepSeek's FP8
checkpoints, so a compiled bf16/fp32 model and a native FP8 one look the same to every later pass and
backend. High precision stays where DeepSeek keeps it: embeddings, lm_head, norms, the router gate and its
bias (those are not ``linear`` weights here, or are named in ``keep``), and the small absorbed per-head MLA
matrices. Weights already in FP8 (a native checkpoint) pass through untouched, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from dsc.ir.graph import Graph, Node, Op, Value, Weight
from dsc.ir.ops import block_scale_shape, dequantize, quantize_fp8
from dsc.ir.types import DType
from dsc.passes.base import PassResult, Quantized, QuantizedPart, QuantizedWeight

KEEP_HIGH_PRECISION = ("model.embed_tokens.weight", "lm_head.weight")
# DeepSeek-V3.2 ships its indexer's per-head weights_proj in high precision (transformers keeps it float32), while
# wq_b / wk are FP8: DESIGN.md §9
KEEP_SUFFIXES = (".indexer.weights_proj.weight",)
FORMAT = "fp8 e4m3, 128x128 block scales"


def _restore(halves: Quantized) -> torch.Tensor:
    values, scales = quantize_fp8(halves.source.load())
    return dequantize(values, scales)


@dataclass(frozen=True)
class Fp8QuantizePass:
    name: ClassVar[str] = "fp8-quantize"
    requires: ClassVar[tuple[str, ...]] = ()
    keep: tuple[str, ...] = KEEP_HIGH_PRECISION

    def run(self, graph: Graph) -> PassResult:
        g = graph.clone()
        quantized, passed_through, kept = 0, 0, []
        done: dict[str, tuple[Value, Value]] = {}
        records: list[QuantizedWeight] = list(g.meta.get("quantized_weights", ()))
        for i, node in enumerate(g.nodes):
            if node.op != Op.LINEAR:
                continue
            w = node.inputs[1]
            if len(node.inputs) == 3:
                passed_through += 1
                continue
            kept_name = w.name in self.keep or w.name.endswith(KEEP_SUFFIXES)
            if kept_name or w.name not in g.weights or w.type.dtype != DType.F32:
                kept.append(w.name)
                continue
            if w.name not in done:
                src = g.weights[w.name].source
                halves = Quantized(src, quantize_fp8, "fp8")
                q = Value(w.name, w.type.with_dtype(DType.F8E4M3))
                s = Value(f"{w.name}_scale_inv", w.type.with_shape(block_scale_shape(w.type.shape)))
                g.weights[q.name] = Weight(q, QuantizedPart(halves, 0))
                g.weights[s.name] = Weight(s, QuantizedPart(halves, 1))
                done[w.name] = (q, s)
                records.append(QuantizedWeight(w.name, g.layer_of(node), FORMAT, src, lambda h=halves: _restore(h)))
                quantized += 1
            q, s = done[w.name]
            meta = {**node.meta, "from_pass": self.name}
            g.nodes[i] = Node(Op.LINEAR, node.name, (node.inputs[0], q, s), node.outputs, node.attrs, meta)
        g.meta["quantized_weights"] = tuple(records)
        stats = {"quantized": quantized, "already_fp8": passed_through, "kept_high_precision": sorted(set(kept))}
        return PassResult(g, quantized > 0, stats)
