"""Weight-only int8 / int4 block quantization for execution in onnxruntime's low-bit CPU kernels.

Every ``linear`` weight (attention projections, dense and shared-expert MLPs, lm_head) and every fused
``moe_experts`` stack becomes int levels plus float32 scales, one per ``block`` consecutive inputs of a row
(``ir.ops.quantize_int``: symmetric, no zero points). The ONNX backend runs them with com.microsoft
MatMulNBits and QMoE at accuracy level 4 (int8 activations), which is where the speed comes from on CPU:
benchmarks/bench_llamacpp.py measures it against llama.cpp.

The embedding table is quantized too, at ``embedding_bits`` (8 by default, whatever ``bits`` is: a gather reads
one row per token, so fewer bits would only save memory, while each row's error goes straight into the
residual stream); it runs in com.microsoft GatherBlockQuantized. What stays float32, and why: the router gate
and its bias (DeepSeek's routing must choose exactly the experts the model chooses), norms, and the small
absorbed per-head MLA matrices (``head_linear``, a batched GEMM with no low-bit kernel).

FP8 weights (a native DeepSeek checkpoint, or fp8-quantize earlier in the pipeline) are dequantized with
their 128x128 scales and re-quantized: the engine then holds int8 where onnxruntime would otherwise fold FP8
to float32 at load. The added error is in ``--report``.

Fused experts need the hidden and intermediate sizes divisible by the block (QMoE's rule); the pass picks
the largest power-of-two block <= ``block`` (and >= 16) that divides both, and leaves a layer in float32
when none does, saying so in the stats.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from dsc.errors import CompileError
from dsc.ir.graph import Graph, Node, Op, Stacked, Transformed, Value, Weight, WeightSource
from dsc.ir.ops import dequantize, dequantize_int, int_scale_shape, quantize_int
from dsc.ir.types import DType, TensorType
from dsc.passes.base import PassResult, Quantized, QuantizedPart, QuantizedWeight

KEEP_FLOAT: tuple[str, ...] = ()
# Chosen by measurement (onnxruntime 1.32, 2 cores AVX2; tests/test_int_accuracy.py on the trained checkpoint).
# Routed experts: blocks of 128, since QMoE at 32 holds 2-3x its weights after prepacking (1.2x / 1x at 128) and
# runs no faster. Linear layers: at accuracy level 4 MatMulNBits quantizes activations per weight block, so the
# block sets the activation error too: int8 blocks of 32 agree with fp32 on 98.9% of held-out positions vs 98.5%
# at 128, but decode costs 4.9 vs 3.2 CPU ms per token on the bench preset (64: 4.5): 128 for both widths.
DEFAULT_BLOCK = {8: 128, 4: 128}
DEFAULT_EXPERT_BLOCK = {8: 128, 4: 128}


def int_halves(source: WeightSource, bits: int, block: int) -> Quantized:
    return Quantized(source, functools.partial(quantize_int, bits=bits, block=block), f"int{bits}/{block}")


def _restore(halves: Quantized) -> torch.Tensor:
    q, scales = halves.quantize(halves.source.load())
    return dequantize_int(q, scales, halves.quantize.keywords["block"])


def _float_source(g: Graph, w: Value, scale: Value | None) -> WeightSource:
    """The float32 weight behind ``w`` (FP8 values and scales dequantized, lazily)."""
    src = g.weights[w.name].source
    if scale is None:
        return src
    return Transformed("dequantize_fp8", (src, g.weights[scale.name].source), dequantize)


def _stacked_float_parts(g: Graph, w: Value, scale: Value | None) -> tuple[WeightSource, ...] | None:
    """Per-expert float32 sources of a stacked expert weight, or None when it is not stacked part by part."""
    src = g.weights[w.name].source
    if not isinstance(src, Stacked):
        return None
    if scale is None:
        return src.parts
    scales = g.weights[scale.name].source
    if not isinstance(scales, Stacked) or len(scales.parts) != len(src.parts):
        return None
    return tuple(Transformed("dequantize_fp8", pair, dequantize) for pair in zip(src.parts, scales.parts, strict=True))


def _scale_type(w: Value, block: int) -> TensorType:
    return TensorType(DType.F32, int_scale_shape(w.type.shape, block))


def _fitting_block(block: int, *dims: int) -> int:
    """The largest power-of-two block <= ``block`` that divides every dim, or 0 when none >= 16 does."""
    while block >= 16 and any(d % block for d in dims):
        block //= 2
    return block if block >= 16 else 0


def describe_format(bits: int, block: int) -> str:
    return f"int{bits} block {block} symmetric"


@dataclass(frozen=True)
class IntQuantizePass:
    name: ClassVar[str] = "int-quantize"
    requires: ClassVar[tuple[str, ...]] = ()
    bits: int = 8
    block: int = 0  # 0 = DEFAULT_BLOCK[bits]
    expert_block: int = 0  # routed experts' block; 0 = DEFAULT_EXPERT_BLOCK[bits]
    experts: bool = True  # quantize fused routed experts (QMoE)
    linears: bool = True  # quantize linear layers (MatMulNBits)
    embedding_bits: int = 8  # the embedding table (GatherBlockQuantized); 0 keeps it float32
    keep: tuple[str, ...] = KEEP_FLOAT

    def __post_init__(self) -> None:
        if self.bits not in DEFAULT_BLOCK:
            raise CompileError(f"int-quantize: bits must be 8 or 4, not {self.bits}")
        if self.embedding_bits not in (0, 4, 8):
            raise CompileError(f"int-quantize: embedding-bits must be 8, 4 or 0, not {self.embedding_bits}")
        for block in (self.block or DEFAULT_BLOCK[self.bits], self.expert_block or 16):
            if block < 16 or block & (block - 1):
                raise CompileError(f"int-quantize: block sizes must be powers of two >= 16, not {block}")

    @property
    def block_size(self) -> int:
        return self.block or DEFAULT_BLOCK[self.bits]

    def run(self, graph: Graph) -> PassResult:
        g = graph.clone()
        records: list[QuantizedWeight] = list(g.meta.get("quantized_weights", ()))
        done: dict[str, tuple[Value, Value, int]] = {}
        stats: dict = {
            "linear": 0,
            "experts": 0,
            "embedding": 0,
            "from_fp8": 0,
            "kept_float": [],
            "experts_kept_float": {},
        }
        for i, node in enumerate(g.nodes):
            if node.op == Op.LINEAR and self.linears:
                new = self._linear(g, node, done, records, stats)
            elif node.op == Op.MOE_EXPERTS and self.experts:
                new = self._experts(g, node, records, stats)
            elif node.op == Op.EMBEDDING and self.embedding_bits:
                new = self._embedding(g, node, done, records, stats)
            else:
                continue
            if new is not None:
                g.nodes[i] = new
        g.remove_dead()  # FP8 scales the int weights replaced
        g.meta["quantized_weights"] = tuple(records)
        g.meta["int_quantization"] = {"bits": self.bits, "block": self.block_size}  # experts: per node attrs
        stats["kept_float"] = sorted(set(stats["kept_float"]))
        return PassResult(g, stats["linear"] + stats["experts"] + stats["embedding"] > 0, stats)

    def _quantized(
        self, g: Graph, name: str, type_: Value, source: WeightSource, block: int, bits: int
    ) -> tuple[Value, Value, Quantized]:
        """Declare ``name``'s int levels and scales as lazy weights; returns them and their shared quantization."""
        halves = int_halves(source, bits, block)
        q = Value(name, type_.type.with_dtype(DType.I8))
        s = Value(f"{name}.int{bits}_scale", _scale_type(type_, block))
        g.weights[q.name] = Weight(q, QuantizedPart(halves, 0))
        g.weights[s.name] = Weight(s, QuantizedPart(halves, 1))
        return q, s, halves

    def _linear(self, g: Graph, node: Node, done: dict, records: list, stats: dict) -> Node | None:
        w = node.inputs[1]
        scale = node.inputs[2] if len(node.inputs) > 2 else None
        if w.name in self.keep or w.name not in g.weights or w.type.dtype not in (DType.F32, DType.F8E4M3):
            stats["kept_float"].append(w.name)
            return None
        if w.name in done and done[w.name][2] != (self.bits, self.block_size):
            return None  # a tied table already quantized for the embedding in another format: keep it float
        if w.name not in done:
            src = _float_source(g, w, scale)
            q, s, halves = self._quantized(g, w.name, w, src, self.block_size, self.bits)
            fmt = describe_format(self.bits, self.block_size) + (" (from fp8)" if scale is not None else "")
            records.append(QuantizedWeight(w.name, g.layer_of(node), fmt, src, functools.partial(_restore, halves)))
            done[w.name] = (q, s, (self.bits, self.block_size))
            stats["linear"] += 1
            stats["from_fp8"] += scale is not None
        q, s, _ = done[w.name]
        attrs = {**node.attrs, "bits": self.bits, "block": self.block_size}
        meta = {**node.meta, "from_pass": self.name}
        return Node(Op.LINEAR, node.name, (node.inputs[0], q, s), node.outputs, attrs, meta)

    def _embedding(self, g: Graph, node: Node, done: dict, records: list, stats: dict) -> Node | None:
        table = node.inputs[1]
        bits, hidden = self.embedding_bits, table.type.shape[1]
        block = _fitting_block(self.block_size, hidden)
        fmt = (bits, block)
        if table.name in self.keep or table.type.dtype != DType.F32 or not block:
            stats["kept_float"].append(table.name)
            return None
        if table.name in done and done[table.name][2] != fmt:
            return None  # tied with an lm_head quantized in another format: keep the table float
        if table.name not in done:
            src = g.weights[table.name].source
            q, s, halves = self._quantized(g, table.name, table, src, block, bits)
            records.append(
                QuantizedWeight(
                    table.name, None, describe_format(bits, block), src, functools.partial(_restore, halves)
                )
            )
            done[table.name] = (q, s, fmt)
            stats["embedding"] += 1
        q, s, _ = done[table.name]
        attrs = {**node.attrs, "bits": bits, "block": block}
        meta = {**node.meta, "from_pass": self.name}
        return Node(Op.EMBEDDING, node.name, (node.inputs[0], q, s), node.outputs, attrs, meta)

    def _experts(self, g: Graph, node: Node, records: list, stats: dict) -> Node | None:
        x, rw, idx, *weights = node.inputs
        mats, scales = weights[:3], (weights[3:] or [None, None, None])
        inter, hidden = mats[0].type.shape[1], mats[0].type.shape[2]
        block = _fitting_block(self.expert_block or DEFAULT_EXPERT_BLOCK[self.bits], hidden, inter)
        if not block:
            stats["experts_kept_float"][node.name] = f"no block >= 16 divides hidden {hidden} and intermediate {inter}"
            return None
        if mats[0].type.dtype not in (DType.F32, DType.F8E4M3):
            stats["experts_kept_float"][node.name] = f"weights are {mats[0].type.dtype.value}"
            return None
        new_q, new_s = [], []
        for w, sc in zip(mats, scales, strict=True):
            parts = _stacked_float_parts(g, w, sc)
            if parts is None:
                stats["experts_kept_float"][node.name] = f"{w.name} is not stacked expert by expert"
                return None
            halves = [int_halves(p, self.bits, block) for p in parts]
            q = Value(w.name, w.type.with_dtype(DType.I8))
            s = Value(f"{w.name}.int{self.bits}_scale", _scale_type(w, block))
            g.weights[q.name] = Weight(q, Stacked(f"int{self.bits}_levels", tuple(QuantizedPart(h, 0) for h in halves)))
            g.weights[s.name] = Weight(s, Stacked(f"int{self.bits}_scales", tuple(QuantizedPart(h, 1) for h in halves)))
            fmt = describe_format(self.bits, block) + (" (from fp8)" if sc is not None else "")
            original = Stacked("stack", parts)
            restore = lambda hs=halves: torch.stack([_restore(h) for h in hs])  # noqa: E731
            records.append(QuantizedWeight(w.name, g.layer_of(node), fmt, original, restore))
            new_q.append(q)
            new_s.append(s)
            stats["from_fp8"] += sc is not None
        stats["experts"] += 1
        attrs = {**node.attrs, "bits": self.bits, "block": block}
        meta = {**node.meta, "from_pass": self.name}
        return Node(Op.MOE_EXPERTS, node.name, (x, rw, idx, *new_q, *new_s), node.outputs, attrs, meta)
