"""Lower the IR to a standard ONNX model (opset 21) and write it with streamed weights.

Conventions of the emitted model (also recorded in the manifest):
- inputs ``input_ids`` / ``position_ids`` int64 [batch, seq], and per layer i the cache
  ``past_key_values.{i}.key`` / ``.value`` [batch, past, heads, dim] (onnxruntime-genai's names; the
  layout is sequence-major, not head-major);
- outputs ``logits`` float32 [batch, seq, vocab] and ``present.{i}.key`` / ``.value`` [batch, past+seq, ...];
- linear weights are stored transposed, [in, out], so each linear layer is a single MatMul.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from dsc.backends.onnx_io import Initializer
from dsc.ir.graph import Graph, Node, Op, Value
from dsc.ir.types import DType
from onnx import TensorProto, helper

OPSET = 21

_ONNX_DTYPE = {
    DType.F32: TensorProto.FLOAT,
    DType.F16: TensorProto.FLOAT16,
    DType.BF16: TensorProto.BFLOAT16,
    DType.F8E4M3: TensorProto.FLOAT8E4M3FN,
    DType.I64: TensorProto.INT64,
    DType.I32: TensorProto.INT32,
    DType.BOOL: TensorProto.BOOL,
}


def _value_info(v: Value) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else str(d) for d in v.type.shape]
    return helper.make_tensor_value_info(v.name, _ONNX_DTYPE[v.type.dtype], dims)


@dataclass
class _Emitter:
    graph: Graph
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[Initializer] = field(default_factory=list)
    _consts: dict[tuple, str] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set)

    def fresh(self, hint: str) -> str:
        name, i = hint, 0
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def emit(self, op_type: str, inputs: list[str], n_out: int = 1, *, name: str, outputs=None, **attrs):
        outs = outputs or [self.fresh(f"{name}/{op_type}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(f"{name}/{op_type}"), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, array: np.ndarray, hint: str = "const") -> str:
        """A small constant initializer, shared between all users of equal content."""
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh(f"const/{hint}")
            tensor = torch.from_numpy(np.array(array, copy=True))
            self.initializers.append(Initializer(name, tensor.dtype, tuple(array.shape), lambda t=tensor: t))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, values, hint="i64") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def f32(self, values, hint="f32") -> str:
        return self.const(np.asarray(values, dtype=np.float32), hint)


# -- per-op lowerings: (emitter, node, input names) -> output names ----------------------------------
def _linear(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    return [e.emit("MatMul", ins, name=n.name, outputs=[n.output.name])]


def _head_linear(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    # x[..., H, in] -> [..., H, 1, in] @ w[H, in, out] -> [..., H, 1, out] -> [..., H, out]
    x = e.emit("Unsqueeze", [ins[0], e.i64([-2])], name=n.name)
    y = e.emit("MatMul", [x, ins[1]], name=n.name)
    return [e.emit("Squeeze", [y, e.i64([-2])], name=n.name, outputs=[n.output.name])]


def _rms_norm(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    x, w = ins
    sq = e.emit("Mul", [x, x], name=n.name)
    ms = e.emit("ReduceMean", [sq, e.i64([-1])], name=n.name, keepdims=1)
    denom = e.emit("Sqrt", [e.emit("Add", [ms, e.f32(n.attrs["eps"])], name=n.name)], name=n.name)
    normed = e.emit("Div", [x, denom], name=n.name)
    return [e.emit("Mul", [normed, w], name=n.name, outputs=[n.output.name])]


def _rope(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    x, pos = ins
    a, rank = n.attrs, n.inputs[0].type.rank
    half = len(a["inv_freq"])
    posf = e.emit("Unsqueeze", [e.emit("Cast", [pos], name=n.name, to=TensorProto.FLOAT), e.i64([-1])], name=n.name)
    freqs = e.emit("Mul", [posf, e.f32(a["inv_freq"], "inv_freq")], name=n.name)  # [b, s, d/2]
    if rank == 4:
        freqs = e.emit("Unsqueeze", [freqs, e.i64([2])], name=n.name)
    cos = e.emit("Cos", [freqs], name=n.name)
    sin = e.emit("Sin", [freqs], name=n.name)
    if a["scaling"] != 1.0:
        cos = e.emit("Mul", [cos, e.f32(a["scaling"])], name=n.name)
        sin = e.emit("Mul", [sin, e.f32(a["scaling"])], name=n.name)
    lead = [0] * (rank - 1)
    if a["interleaved"]:  # pairs (x[2i], x[2i+1]): view [..., d/2, 2], rotate, view back
        pairs = e.emit("Reshape", [x, e.i64(lead + [half, 2])], name=n.name)
        x1, x2 = e.emit("Split", [pairs, e.i64([1, 1])], 2, name=n.name, axis=-1)
        x1 = e.emit("Squeeze", [x1, e.i64([-1])], name=n.name)
        x2 = e.emit("Squeeze", [x2, e.i64([-1])], name=n.name)
    else:
        x1, x2 = e.emit("Split", [x, e.i64([half, half])], 2, name=n.name, axis=-1)
    r1 = e.emit("Sub", [e.emit("Mul", [x1, cos], name=n.name), e.emit("Mul", [x2, sin], name=n.name)], name=n.name)
    r2 = e.emit("Add", [e.emit("Mul", [x2, cos], name=n.name), e.emit("Mul", [x1, sin], name=n.name)], name=n.name)
    if a["interleaved"]:
        r1 = e.emit("Unsqueeze", [r1, e.i64([-1])], name=n.name)
        r2 = e.emit("Unsqueeze", [r2, e.i64([-1])], name=n.name)
        stacked = e.emit("Concat", [r1, r2], name=n.name, axis=-1)
        return [e.emit("Reshape", [stacked, e.i64(lead + [2 * half])], name=n.name, outputs=[n.output.name])]
    return [e.emit("Concat", [r1, r2], name=n.name, axis=-1, outputs=[n.output.name])]


def _attention(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    q, k, v = ins
    qh = e.emit("Transpose", [q], name=n.name, perm=[0, 2, 1, 3])  # [b, h, s, d]
    kt = e.emit("Transpose", [k], name=n.name, perm=[0, 2, 3, 1])  # [b, h, d, T]
    vh = e.emit("Transpose", [v], name=n.name, perm=[0, 2, 1, 3])  # [b, h, T, dv]
    scores = e.emit("Mul", [e.emit("MatMul", [qh, kt], name=n.name), e.f32(n.attrs["scale"])], name=n.name)
    # Causal mask with the cache in front: key j is hidden from query i when j > (T - s) + i.
    s_len = e.emit("Gather", [e.emit("Shape", [q], name=n.name), e.i64(1)], name=n.name, axis=0)
    t_len = e.emit("Gather", [e.emit("Shape", [k], name=n.name), e.i64(1)], name=n.name, axis=0)
    zero, one = e.i64(0), e.i64(1)
    offset = e.emit("Sub", [t_len, s_len], name=n.name)
    rows = e.emit("Add", [e.emit("Range", [zero, s_len, one], name=n.name), offset], name=n.name)
    cols = e.emit("Range", [zero, t_len, one], name=n.name)
    hidden = e.emit("Greater", [cols, e.emit("Unsqueeze", [rows, e.i64([1])], name=n.name)], name=n.name)
    masked = e.emit("Where", [hidden, e.f32(-np.inf), scores], name=n.name)
    probs = e.emit("Softmax", [masked], name=n.name, axis=-1)
    out = e.emit("MatMul", [probs, vh], name=n.name)
    return [e.emit("Transpose", [out], name=n.name, perm=[0, 2, 1, 3], outputs=[n.output.name])]


def _moe_route(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    x, gate = ins[0], ins[1]
    n_exp, k, groups = a["num_experts"], a["top_k"], a["n_group"]
    logits = e.emit("MatMul", [x, gate], name=n.name)  # gate stored [H, E]
    scores = e.emit(
        "Sigmoid" if a["scoring"] == "sigmoid" else "Softmax",
        [logits],
        name=n.name,
        **({} if a["scoring"] == "sigmoid" else {"axis": -1}),
    )
    choice = e.emit("Add", [scores, ins[2]], name=n.name) if len(ins) > 2 else scores
    if a["method"] in ("noaux_tc", "group_limited_greedy") and groups > 1:
        grouped = e.emit("Reshape", [choice, e.i64([0, 0, groups, n_exp // groups])], name=n.name)
        if a["method"] == "noaux_tc":
            top2, _ = e.emit("TopK", [grouped, e.i64([2])], 2, name=n.name, axis=-1)
            group_scores = e.emit("ReduceSum", [top2, e.i64([-1])], name=n.name, keepdims=0)
        else:
            group_scores = e.emit("ReduceMax", [grouped, e.i64([-1])], name=n.name, keepdims=0)
        _, top_groups = e.emit("TopK", [group_scores, e.i64([a["topk_group"]])], 2, name=n.name, axis=-1)
        zeros = e.emit("Mul", [group_scores, e.f32(0.0)], name=n.name)
        ones = e.emit(
            "Add",
            [
                e.emit("Slice", [zeros, e.i64([0]), e.i64([a["topk_group"]]), e.i64([-1])], name=n.name),
                e.f32(1.0),
            ],
            name=n.name,
        )
        group_mask = e.emit("ScatterElements", [zeros, top_groups, ones], name=n.name, axis=-1)
        expert_mask = e.emit(
            "Reshape",
            [
                e.emit(
                    "Expand",
                    [
                        e.emit("Unsqueeze", [group_mask, e.i64([-1])], name=n.name),
                        e.i64([1, 1, 1, n_exp // groups]),
                    ],
                    name=n.name,
                ),
                e.i64([0, 0, n_exp]),
            ],
            name=n.name,
        )
        keep = e.emit("Cast", [expert_mask], name=n.name, to=TensorProto.BOOL)
        fill = -np.inf if a["method"] == "noaux_tc" else 0.0
        choice = e.emit("Where", [keep, choice, e.f32(fill)], name=n.name)
    _, experts = e.emit("TopK", [choice, e.i64([k])], 2, name=n.name, axis=-1)
    weights = e.emit("GatherElements", [scores, experts], name=n.name, axis=-1)
    if a["norm_topk_prob"] and k > 1:
        total = e.emit("ReduceSum", [weights, e.i64([-1])], name=n.name, keepdims=1)
        weights = e.emit("Div", [weights, e.emit("Add", [total, e.f32(1e-20)], name=n.name)], name=n.name)
    out_w = e.emit("Mul", [weights, e.f32(a["scaling"])], name=n.name, outputs=[n.outputs[0].name])
    ident = e.emit("Identity", [experts], name=n.name, outputs=[n.outputs[1].name])
    return [out_w, ident]


def _moe_combine(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    w, idx, ys = ins[0], ins[1], ins[2:]
    n_exp = n.attrs["num_experts"]
    lead = e.emit("Slice", [e.emit("Shape", [w], name=n.name), e.i64([0]), e.i64([-1])], name=n.name)
    zeros = e.emit(
        "ConstantOfShape",
        [e.emit("Concat", [lead, e.i64([n_exp])], name=n.name, axis=0)],
        name=n.name,
        value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
    )
    dense = e.emit("ScatterElements", [zeros, idx, w], name=n.name, axis=-1)  # [b, s, E]
    stacked = e.emit("Concat", [e.emit("Unsqueeze", [y, e.i64([-2])], name=n.name) for y in ys], name=n.name, axis=-2)
    mixed = e.emit("MatMul", [e.emit("Unsqueeze", [dense, e.i64([-2])], name=n.name), stacked], name=n.name)
    return [e.emit("Squeeze", [mixed, e.i64([-2])], name=n.name, outputs=[n.output.name])]


def _simple(op_type: str, **fixed) -> Callable:
    def lower(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
        attrs = {**fixed}
        if n.op == Op.CONCAT:
            attrs["axis"] = n.attrs["axis"]
        return [e.emit(op_type, ins, name=n.name, outputs=[n.output.name], **attrs)]

    return lower


def _silu(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    return [e.emit("Mul", [ins[0], e.emit("Sigmoid", ins, name=n.name)], name=n.name, outputs=[n.output.name])]


def _split(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    return e.emit(
        "Split",
        [ins[0], e.i64(list(n.attrs["sizes"]))],
        len(n.outputs),
        name=n.name,
        outputs=[v.name for v in n.outputs],
        axis=n.attrs["axis"],
    )


def _reshape(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    return [e.emit("Reshape", [ins[0], e.i64(list(n.attrs["shape"]))], name=n.name, outputs=[n.output.name])]


def _expand(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    shape = [1] * n.inputs[0].type.rank
    shape[n.attrs["axis"]] = n.attrs["size"]
    return [e.emit("Expand", [ins[0], e.i64(shape)], name=n.name, outputs=[n.output.name])]


def _embedding(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    return [e.emit("Gather", [ins[1], ins[0]], name=n.name, outputs=[n.output.name], axis=0)]


LOWERINGS: dict[Op, Callable[[_Emitter, Node, list[str]], list[str]]] = {
    Op.EMBEDDING: _embedding,
    Op.LINEAR: _linear,
    Op.HEAD_LINEAR: _head_linear,
    Op.RMS_NORM: _rms_norm,
    Op.ROPE: _rope,
    Op.ATTENTION: _attention,
    Op.ADD: _simple("Add"),
    Op.MUL: _simple("Mul"),
    Op.SILU: _silu,
    Op.SPLIT: _split,
    Op.CONCAT: _simple("Concat"),
    Op.RESHAPE: _reshape,
    Op.EXPAND: _expand,
    Op.MOE_ROUTE: _moe_route,
    Op.MOE_COMBINE: _moe_combine,
}

# Weights consumed as the right-hand side of a MatMul are stored with their last two axes swapped ([in, out]).
_TRANSPOSED_INPUTS = {Op.LINEAR: 1, Op.MOE_ROUTE: 1, Op.HEAD_LINEAR: 1}


def lower_to_onnx(graph: Graph, *, producer_version: str = "0") -> tuple[onnx.ModelProto, list[Initializer]]:
    """The ONNX model (without initializers) and its weight initializers, in a deterministic order."""
    e = _Emitter(graph)
    e._names.update(v.name for v in graph.values())
    layouts: dict[str, set[str]] = {}
    for node in graph.nodes:
        for i, v in enumerate(node.inputs):
            if v.name in graph.weights:
                layouts.setdefault(v.name, set()).add("T" if _TRANSPOSED_INPUTS.get(node.op) == i else "N")
    weight_names: dict[tuple[str, str], str] = {}
    for name, w in graph.weights.items():
        for layout in sorted(layouts.get(name, ())):
            t = w.value.type
            if layout == "N":
                init = Initializer(name, t.dtype.torch, tuple(t.shape), w.load)
            else:
                shape = tuple(t.shape[:-2]) + (t.shape[-1], t.shape[-2])
                init = Initializer(
                    f"{name}.T" if "N" in layouts[name] else name,
                    t.dtype.torch,
                    shape,
                    lambda w=w: w.load().transpose(-1, -2).contiguous(),
                )
            e._names.add(init.name)
            weight_names[(name, layout)] = init.name
            e.initializers.append(init)
    for node in graph.nodes:
        ins = []
        for i, v in enumerate(node.inputs):
            if v.name in graph.weights:
                layout = "T" if _TRANSPOSED_INPUTS.get(node.op) == i else "N"
                ins.append(weight_names[(v.name, layout)])
            else:
                ins.append(v.name)
        LOWERINGS[node.op](e, node, ins)
    onnx_graph = helper.make_graph(
        e.nodes, graph.name, [_value_info(v) for v in graph.inputs], [_value_info(v) for v in graph.outputs]
    )
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="dsc",
        producer_version=producer_version,
    )
    model.ir_version = 10
    return model, e.initializers


def weight_layout_note() -> str:
    return "linear and router weights stored transposed [in, out]; embeddings [vocab, hidden]"
