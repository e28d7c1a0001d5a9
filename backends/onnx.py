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
from dsc.ir.graph import Graph, Node, Op, Stacked, Value
from dsc.ir.ops import FP8_BLOCK
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
    moe_lowering: str = "contrib"
    rope_tables: dict[tuple, tuple[str, str]] = field(default_factory=dict)
    masks: dict[tuple, str] = field(default_factory=dict)
    _consts: dict[tuple, str] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set)
    _owned: dict[tuple, str] = field(default_factory=dict)

    def owned_weight(self, node: Node, layout: str) -> str:
        """An initializer built by a lowering from some of ``node``'s weight inputs (one per layout)."""
        inputs, fn = _OWNED_LAYOUTS[layout](node)
        weights = [self.graph.weights[node.inputs[i].name] for i in inputs]
        key = (layout, tuple(w.name for w in weights))
        if key not in self._owned:
            sample = fn(
                *(torch.empty(w.value.type.shape, dtype=w.value.type.dtype.torch, device="meta") for w in weights)
            )
            name = self.fresh(f"{weights[0].name}.{layout}")
            build = _per_expert(fn)
            self.initializers.append(
                Initializer(
                    name, sample.dtype, tuple(sample.shape), lambda ws=weights, b=build: b(*(w.source for w in ws))
                )
            )
            self._owned[key] = name
        return self._owned[key]

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
def _dequantize(e: _Emitter, n: Node, weight: str, scale: str, axis: int) -> str:
    """FP8 weights in the file, float32 at run time: DequantizeLinear with blocks of 128 along one axis (opset
    21; onnxruntime's CPU kernel and TensorRT block along one axis only, so DeepSeek's 128x128 block scales are
    repeated along the other axis: 4 bytes per 128 weights, DESIGN.md §5)."""
    return e.emit("DequantizeLinear", [weight, scale], name=n.name, axis=axis, block_size=FP8_BLOCK)


def _linear(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    weight = ins[1]
    if len(n.inputs) == 3:  # FP8: weight stored [in, out], scales [in / 128, out]
        weight = _dequantize(e, n, weight, e.owned_weight(n, "linear_scale_t"), axis=0)
    return [e.emit("MatMul", [ins[0], weight], name=n.name, outputs=[n.output.name])]


def _head_linear(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    # x[..., H, in] -> [..., H, 1, in] @ w[H, in, out] -> [..., H, 1, out] -> [..., H, out]
    x = e.emit("Unsqueeze", [ins[0], e.i64([-2])], name=n.name)
    y = e.emit("MatMul", [x, ins[1]], name=n.name)
    return [e.emit("Squeeze", [y, e.i64([-2])], name=n.name, outputs=[n.output.name])]


def _rms_norm(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    x, w = ins
    sq = e.emit("Pow", [x, e.f32(2.0)], name=n.name)  # Pow, not Mul: onnxruntime fuses this RMSNorm form
    ms = e.emit("ReduceMean", [sq, e.i64([-1])], name=n.name, keepdims=1)
    denom = e.emit("Sqrt", [e.emit("Add", [ms, e.f32(n.attrs["eps"])], name=n.name)], name=n.name)
    normed = e.emit("Div", [x, denom], name=n.name)
    return [e.emit("Mul", [normed, w], name=n.name, outputs=[n.output.name])]


def _rotation(half: int, interleaved: bool) -> np.ndarray:
    """R with x @ R = the rotated partner of every element: (-x[2i+1], x[2i]) per pair when interleaved (DeepSeek),
    (-x[i+h], x[i]) in rotate_half order otherwise. Entries are 0 and +-1, so the product is exact."""
    r = np.zeros((2 * half, 2 * half), dtype=np.float32)
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        r[b, a], r[a, b] = -1.0, 1.0
    return r


def _rope(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    """x * cos + (x @ R) * sin, with cos/sin over the full head dim computed once per graph and shared by every
    rope of the same positions and frequencies (four kernels per rope instead of about twenty)."""
    x, pos = ins
    a, rank = n.attrs, n.inputs[0].type.rank
    half = len(a["inv_freq"])
    key = (pos, a["inv_freq"], a["scaling"], a["interleaved"], rank)
    if key not in e.rope_tables:
        inv = np.repeat(a["inv_freq"], 2) if a["interleaved"] else np.tile(a["inv_freq"], 2)
        posf = e.emit("Unsqueeze", [e.emit("Cast", [pos], name=n.name, to=TensorProto.FLOAT), e.i64([-1])], name=n.name)
        freqs = e.emit("Mul", [posf, e.f32(inv, "inv_freq")], name=n.name)  # [b, s, d]
        if rank == 4:
            freqs = e.emit("Unsqueeze", [freqs, e.i64([2])], name=n.name)  # [b, s, 1, d]
        cos, sin = e.emit("Cos", [freqs], name=n.name), e.emit("Sin", [freqs], name=n.name)
        if a["scaling"] != 1.0:
            cos = e.emit("Mul", [cos, e.f32(a["scaling"])], name=n.name)
            sin = e.emit("Mul", [sin, e.f32(a["scaling"])], name=n.name)
        e.rope_tables[key] = (cos, sin)
    cos, sin = e.rope_tables[key]
    rotated = e.emit("MatMul", [x, e.f32(_rotation(half, a["interleaved"]), "rope_rotation")], name=n.name)
    return [
        e.emit(
            "Add",
            [e.emit("Mul", [x, cos], name=n.name), e.emit("Mul", [rotated, sin], name=n.name)],
            name=n.name,
            outputs=[n.output.name],
        )
    ]


def _attention(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    q, k, v = ins
    qh = e.emit("Transpose", [q], name=n.name, perm=[0, 2, 1, 3])  # [b, h, s, d]
    kt = e.emit("Transpose", [k], name=n.name, perm=[0, 2, 3, 1])  # [b, h, d, T]
    vh = e.emit("Transpose", [v], name=n.name, perm=[0, 2, 1, 3])  # [b, h, T, dv]
    scores = e.emit("Mul", [e.emit("MatMul", [qh, kt], name=n.name), e.f32(n.attrs["scale"])], name=n.name)
    # Causal mask with the cache in front: key j is hidden from query i when j > (T - s) + i. Every attention
    # with the same symbolic (s, T) shares one mask.
    key = (n.inputs[0].type.shape[1], n.inputs[1].type.shape[1])
    if key not in e.masks:
        s_len = e.emit("Gather", [e.emit("Shape", [q], name=n.name), e.i64(1)], name=n.name, axis=0)
        t_len = e.emit("Gather", [e.emit("Shape", [k], name=n.name), e.i64(1)], name=n.name, axis=0)
        zero, one = e.i64(0), e.i64(1)
        offset = e.emit("Sub", [t_len, s_len], name=n.name)
        rows = e.emit("Add", [e.emit("Range", [zero, s_len, one], name=n.name), offset], name=n.name)
        cols = e.emit("Range", [zero, t_len, one], name=n.name)
        e.masks[key] = e.emit("Greater", [cols, e.emit("Unsqueeze", [rows, e.i64([1])], name=n.name)], name=n.name)
    hidden = e.masks[key]
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


def _moe_experts(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    """Routed experts, computing only the chosen ones (see ``MOE_LOWERINGS``)."""
    return MOE_LOWERINGS[e.moe_lowering](e, n, ins)


def _flat_routing(e: _Emitter, n: Node, ins: list[str]) -> tuple[str, str, str, str]:
    """x as [tokens, H], routing weights and experts as [tokens, k], and the original shape of x."""
    x, w, idx = ins[:3]
    hidden, k = n.inputs[0].type.shape[-1], n.inputs[1].type.shape[-1]
    shape = e.emit("Shape", [x], name=n.name)
    return (
        e.emit("Reshape", [x, e.i64([-1, hidden])], name=n.name),
        e.emit("Reshape", [w, e.i64([-1, k])], name=n.name),
        e.emit("Reshape", [idx, e.i64([-1, k])], name=n.name),
        shape,
    )


def _moe_contrib(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    """onnxruntime's com.microsoft MoE kernel (CPU: interleaved SwiGLU, alpha 1, beta 0 = silu(g) * u).

    Its router applies softmax and top-k to the probabilities it is given. Feeding it log(w) scattered over
    the chosen experts (log 0 = -inf elsewhere) makes softmax return w / sum(w) at exactly DeepSeek's
    choices, and multiplying the output by sum(w) restores the weights: routing stays exact (DESIGN.md §8).
    """
    n_exp, k = n.attrs["num_experts"], n.inputs[1].type.shape[-1]
    x2, w2, idx2, shape = _flat_routing(e, n, ins)
    zeros = e.emit(
        "ConstantOfShape",
        [e.emit("Concat", [e.emit("Shape", [w2], name=n.name, end=1), e.i64([n_exp])], name=n.name, axis=0)],
        name=n.name,
        value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
    )
    dense = e.emit("ScatterElements", [zeros, idx2, w2], name=n.name, axis=-1)
    logits = e.emit("Log", [dense], name=n.name)
    fc1, fc2 = e.owned_weight(n, "glu_interleaved"), e.owned_weight(n, "down")
    if len(n.inputs) > 6:  # FP8 experts: per-row block scales along the input axis
        fc1 = _dequantize(e, n, fc1, e.owned_weight(n, "glu_interleaved_scale"), axis=2)
        fc2 = _dequantize(e, n, fc2, e.owned_weight(n, "down_scale"), axis=2)
    y = e.emit(
        "MoE",
        [x2, logits, fc1, "", fc2],
        name=n.name,
        domain="com.microsoft",
        k=k,
        activation_type="swiglu",
        swiglu_fusion=1,
        activation_alpha=1.0,
        activation_beta=0.0,
        swiglu_limit=1e30,
        normalize_routing_weights=0,
    )
    total = e.emit("ReduceSum", [w2, e.i64([-1])], name=n.name, keepdims=1)
    y = e.emit("Mul", [y, total], name=n.name)
    return [e.emit("Reshape", [y, shape], name=n.name, outputs=[n.output.name])]


def _moe_gather(e: _Emitter, n: Node, ins: list[str]) -> list[str]:
    """Standard ops only: gather each token's chosen experts' weights and apply them (batched MatMul).

    Exact and sparse, and what TensorRT can parse; it copies k expert matrices per token, which is cheap for
    decode (one token) and grows with the prompt for prefill."""
    inter = n.inputs[3].type.shape[1]
    x2, w2, idx2, shape = _flat_routing(e, n, ins)
    gate_up_w, down_w = e.owned_weight(n, "gate_up_t"), e.owned_weight(n, "down_t")
    if len(n.inputs) > 6:  # FP8 experts: blocks along the input axis (now axis 1)
        gate_up_w = _dequantize(e, n, gate_up_w, e.owned_weight(n, "gate_up_t_scale"), axis=1)
        down_w = _dequantize(e, n, down_w, e.owned_weight(n, "down_t_scale"), axis=1)
    gate_up = e.emit("Gather", [gate_up_w, idx2], name=n.name, axis=0)  # [T, k, H, 2I]
    down = e.emit("Gather", [down_w, idx2], name=n.name, axis=0)  # [T, k, I, H]
    xs = e.emit("Unsqueeze", [x2, e.i64([1, 2])], name=n.name)  # [T, 1, 1, H]
    g, u = e.emit(
        "Split", [e.emit("MatMul", [xs, gate_up], name=n.name), e.i64([inter, inter])], 2, name=n.name, axis=-1
    )
    h = e.emit("Mul", [e.emit("Mul", [g, e.emit("Sigmoid", [g], name=n.name)], name=n.name), u], name=n.name)
    y = e.emit("Squeeze", [e.emit("MatMul", [h, down], name=n.name), e.i64([2])], name=n.name)  # [T, k, H]
    y = e.emit("Mul", [y, e.emit("Unsqueeze", [w2, e.i64([-1])], name=n.name)], name=n.name)
    y = e.emit("ReduceSum", [y, e.i64([1])], name=n.name, keepdims=0)
    return [e.emit("Reshape", [y, shape], name=n.name, outputs=[n.output.name])]


MOE_LOWERINGS = {"contrib": _moe_contrib, "gather": _moe_gather}


def _glu_interleaved(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.stack([gate, up], dim=2).flatten(1, 2).contiguous()  # rows g0, u0, g1, u1, ...


def _per_expert(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Apply a layout transform expert by expert into one preallocated tensor, so that building a layer's
    stacked initializer holds the result plus one expert, not several stacked copies."""

    def build(*sources) -> torch.Tensor:
        if not all(isinstance(s, Stacked) for s in sources):
            return fn(*(s.load() for s in sources))
        out = None
        for e, parts in enumerate(zip(*(s.parts for s in sources), strict=True)):
            piece = fn(*(p.load()[None] for p in parts))[0]
            if out is None:
                out = torch.empty((len(sources[0].parts), *piece.shape), dtype=piece.dtype)
            out[e] = piece
        return out

    return build


def _rows(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """Block scales [..., rows / 128, c] repeated to one per row: [..., rows, c]."""
    return scale.repeat_interleave(FP8_BLOCK, dim=-2)[..., :rows, :]


def _layout(inputs: tuple[int, ...], fn: Callable[..., torch.Tensor]):
    return lambda node: (inputs, fn)


# Weights some lowerings lay out themselves: layout name -> node -> (node inputs used, transform).
_OWNED_LAYOUTS: dict[str, Callable[[Node], tuple[tuple[int, ...], Callable[..., torch.Tensor]]]] = {
    "linear_scale_t": lambda n: ((2,), lambda s, out=n.inputs[1].type.shape[0]: _rows(s, out).t().contiguous()),
    "glu_interleaved": _layout((3, 4), _glu_interleaved),
    "glu_interleaved_scale": lambda n: (
        (6, 7),
        lambda g, u, i=n.inputs[3].type.shape[1]: _glu_interleaved(_rows(g, i), _rows(u, i)),
    ),
    "down": _layout((5,), lambda d: d),
    "down_scale": lambda n: ((8,), lambda d, h=n.inputs[5].type.shape[1]: _rows(d, h).contiguous()),
    "gate_up_t": _layout((3, 4), lambda g, u: torch.cat([g, u], dim=1).transpose(1, 2).contiguous()),
    "gate_up_t_scale": lambda n: (
        (6, 7),
        lambda g, u, i=n.inputs[3].type.shape[1]: (
            torch.cat([_rows(g, i), _rows(u, i)], dim=1).transpose(1, 2).contiguous()
        ),
    ),
    "down_t": _layout((5,), lambda d: d.transpose(1, 2).contiguous()),
    "down_t_scale": lambda n: ((8,), lambda d, h=n.inputs[5].type.shape[1]: _rows(d, h).transpose(1, 2).contiguous()),
}
_OWNED_INPUTS = {Op.MOE_EXPERTS: {3, 4, 5, 6, 7, 8}, Op.LINEAR: {2}}


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
    Op.MOE_EXPERTS: _moe_experts,
}

# Weights consumed as the right-hand side of a MatMul are stored with their last two axes swapped ([in, out]).
_TRANSPOSED_INPUTS = {Op.LINEAR: 1, Op.MOE_ROUTE: 1, Op.HEAD_LINEAR: 1}


def lower_to_onnx(
    graph: Graph, *, producer_version: str = "0", moe_lowering: str = "contrib"
) -> tuple[onnx.ModelProto, list[Initializer]]:
    """The ONNX model (without initializers) and its weight initializers, in a deterministic order.

    ``moe_lowering`` picks how fused experts run: "contrib" (onnxruntime's com.microsoft MoE kernel, the
    fastest on CPU) or "gather" (standard ops only, for runtimes without that kernel, such as TensorRT)."""
    if moe_lowering not in MOE_LOWERINGS:
        raise ValueError(f"moe_lowering must be one of {sorted(MOE_LOWERINGS)}")
    e = _Emitter(graph, moe_lowering=moe_lowering)
    e._names.update(v.name for v in graph.values())
    layouts: dict[str, set[str]] = {}
    for node in graph.nodes:
        for i, v in enumerate(node.inputs):
            if v.name in graph.weights and i not in _OWNED_INPUTS.get(node.op, ()):
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
            if i in _OWNED_INPUTS.get(node.op, ()):
                ins.append("")  # laid out by the op's lowering (Emitter.owned_weight)
            elif v.name in graph.weights:
                layout = "T" if _TRANSPOSED_INPUTS.get(node.op) == i else "N"
                ins.append(weight_names[(v.name, layout)])
            else:
                ins.append(v.name)
        LOWERINGS[node.op](e, node, ins)
    onnx_graph = helper.make_graph(
        e.nodes, graph.name, [_value_info(v) for v in graph.inputs], [_value_info(v) for v in graph.outputs]
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if any(nd.domain == "com.microsoft" for nd in e.nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(
        onnx_graph,
        opset_imports=opsets,
        producer_name="dsc",
        producer_version=producer_version,
    )
    model.ir_version = 10
    return model, e.initializers
