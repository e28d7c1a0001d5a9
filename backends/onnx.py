"""Lower the IR to a standard ONNX model (opset 21) and write it with streamed weights.

Conventions of the emitted model (also recorded in the manifest):
- inputs ``input_ids`` / ``position_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, past+seq], and per
  layer i the cache ``past_key_values.{i}.key`` / ``.value`` [batch, heads, past, dim] (onnxruntime-genai's names
  and layout, ir/graph.py cache_layout);
- outputs ``logits`` float32 [batch, seq, vocab] and ``present.{i}.key`` / ``.value`` [batch, heads, past+seq, dim];
- linear weights are stored transposed, [in, out], so each linear layer is a single MatMul.

Everything the backend knows about one IR op is one ``Lowering`` record in ``LOWERINGS``: the function that
emits its ONNX nodes through a ``Tape`` bound to the IR node, which weight inputs are stored transposed, and
which weight inputs the lowering lays out itself. tests/backends/test_lowerings.py runs every record against
the op's reference implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from dsc.backends.onnx_io import ONNX_DTYPES, Initializer
from dsc.ir.graph import Graph, Node, Op, Stacked, Value, Weight
from dsc.ir.ops import EMPTY_SLOT_COLUMNS, FP8_BLOCK, MASKED_SCORE
from dsc.ir.types import DType
from onnx import TensorProto, helper

OPSET = 21
_ZERO = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])  # ConstantOfShape's fill value


def _value_info(v: Value) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else str(d) for d in v.type.shape]
    return helper.make_tensor_value_info(v.name, ONNX_DTYPES[v.type.dtype.torch], dims)


# -- the record --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """An initializer a lowering builds itself from some of its node's weight inputs (say gate and up
    interleaved into one matrix). ``build(node, *weights)`` runs at write time, expert by expert."""

    inputs: tuple[int, ...]
    build: Callable[..., torch.Tensor]
    when: Callable[[Node], bool] = lambda n: True  # the nodes this layout applies to (say, int weights only)


@dataclass(frozen=True)
class Lowering:
    """Everything the ONNX backend needs about one IR op.

    ``lower(tape, node, ins)`` emits the op's ONNX nodes; ``ins`` are the ONNX names of the node's inputs ("" for
    inputs in ``layouts``, which the lowering fetches with ``tape.owned``). Weight inputs listed in ``transposed``
    are stored with their last two axes swapped ([in, out]) because they are the right-hand side of a MatMul,
    unless a layout that applies to the node (``Layout.when``) owns them: int weights of a linear are packed for
    MatMulNBits instead."""

    op: Op
    lower: Callable[[Tape, Node, list[str]], None]
    transposed: tuple[int, ...] = ()
    layouts: Mapping[str, Layout] = field(default_factory=dict)

    def owned(self, node: Node) -> frozenset[int]:
        """Weight inputs of ``node`` the lowering lays out itself: the generic weight writer skips them."""
        return frozenset(i for layout in self.layouts.values() if layout.when(node) for i in layout.inputs)


# -- the model being built, and the per-node tape that lowerings write to ----------------------------
@dataclass
class _Emitter:
    """The ONNX nodes and initializers emitted so far, and every name taken (IR values included)."""

    graph: Graph
    moe_lowering: str = "contrib"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[Initializer] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)
    _consts: dict[tuple, str] = field(default_factory=dict)
    _owned: dict[tuple, str] = field(default_factory=dict)
    _shared: dict[Hashable, Any] = field(default_factory=dict)

    def fresh(self, hint: str) -> str:
        name, i = hint, 0
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def const(self, array: np.ndarray, hint: str) -> str:
        """A small constant initializer, shared between all users of equal content."""
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh(f"const/{hint}")
            tensor = torch.from_numpy(np.array(array, copy=True))
            self.initializers.append(Initializer(name, tensor.dtype, tuple(array.shape), lambda t=tensor: t))
            self._consts[key] = name
        return self._consts[key]

    def owned_weight(self, layout: str, weights: list[Weight], fn: Callable[..., torch.Tensor]) -> str:
        """The initializer ``fn(*weights)``, declared once per (layout, weights) with its shape from meta tensors."""
        key = (layout, tuple(w.name for w in weights))
        if key not in self._owned:
            sample = fn(
                *(torch.empty(w.value.type.shape, dtype=w.value.type.dtype.torch, device="meta") for w in weights)
            )
            name = self.fresh(f"{weights[0].name}.{layout}")
            build = _per_expert(fn)
            self.initializers.append(
                Initializer(name, sample.dtype, tuple(sample.shape), lambda: build(*(w.source for w in weights)))
            )
            self._owned[key] = name
        return self._owned[key]


@dataclass(frozen=True)
class Tape:
    """Emits the ONNX nodes of one IR node. Every ONNX node and fresh value is named ``{node}/{op_type}`` (made
    unique), so a profile or an error in the ONNX model points back at the IR node it came from."""

    e: _Emitter
    node: Node
    lowering: Lowering

    def _emit(self, op_type: str, inputs: Sequence[str], outputs: list[str], attrs: dict) -> None:
        name = self.e.fresh(f"{self.node.name}/{op_type}")
        self.e.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))

    def op(self, op_type: str, inputs: Sequence[str], **attrs) -> str:
        """One ONNX node with one fresh output."""
        return self.op_multi(op_type, inputs, 1, **attrs)[0]

    def op_multi(self, op_type: str, inputs: Sequence[str], n_out: int, **attrs) -> list[str]:
        outputs = [self.e.fresh(f"{self.node.name}/{op_type}") for _ in range(n_out)]
        self._emit(op_type, inputs, outputs, attrs)
        return outputs

    def result(self, op_type: str, inputs: Sequence[str], outputs: Sequence[Value] | None = None, **attrs) -> None:
        """The ONNX node that computes the IR node's outputs (all of them, or those given), under their IR names."""
        self._emit(op_type, inputs, [v.name for v in (self.node.outputs if outputs is None else outputs)], attrs)

    def i64(self, values, hint: str = "i64") -> str:
        return self.e.const(np.asarray(values, dtype=np.int64), hint)

    def f32(self, values, hint: str = "f32") -> str:
        return self.e.const(np.asarray(values, dtype=np.float32), hint)

    def shared(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per graph for each key: nodes that many IR nodes can reuse (rope tables, masks)."""
        if key not in self.e._shared:
            self.e._shared[key] = build()
        return self.e._shared[key]

    def owned(self, layout: str) -> str:
        """The initializer that this op's ``layout`` builds from the node's weights."""
        spec = self.lowering.layouts[layout]
        weights = [self.e.graph.weights[self.node.inputs[i].name] for i in spec.inputs]
        return self.e.owned_weight(layout, weights, functools.partial(spec.build, self.node))

    @property
    def moe_lowering(self) -> str:
        return self.e.moe_lowering


# -- per-op lowerings: (tape, node, input names) -> None; the last node writes the IR outputs ---------
def _dequantize(t: Tape, weight: str, scale: str, axis: int) -> str:
    """FP8 weights in the file, float32 at run time: DequantizeLinear with blocks of 128 along one axis (opset
    21; onnxruntime's CPU kernel and TensorRT block along one axis only, so DeepSeek's 128x128 block scales are
    repeated along the other axis: 4 bytes per 128 weights, DESIGN.md §5)."""
    return t.op("DequantizeLinear", [weight, scale], axis=axis, block_size=FP8_BLOCK)


def _is_int(n: Node) -> bool:
    """Weights in int levels with block scales (the int-quantize pass): run by onnxruntime's low-bit kernels."""
    return n.inputs[3 if n.op == Op.MOE_EXPERTS else 1].type.dtype == DType.I8


def _is_fp8(n: Node) -> bool:
    return n.inputs[3 if n.op == Op.MOE_EXPERTS else 1].type.dtype == DType.F8E4M3


# int8 activations (accuracy level 4): the fast path of MatMulNBits and QMoE on CPU. At level 0, 8-bit
# MatMulNBits dequantizes the whole weight on every call (12-35x slower than float32): never emit that.
ACCURACY_LEVEL = 4


def _linear(t: Tape, n: Node, ins: list[str]) -> None:
    weight = ins[1]
    if _is_int(n):  # com.microsoft MatMulNBits: B [N, K/block, block*bits/8] uint8, scales [N, K/block]
        out_features, in_features = n.inputs[1].type.shape
        t.result(
            "MatMulNBits",
            [ins[0], t.owned("nbits"), t.owned("nbits_scale")],
            domain="com.microsoft",
            K=in_features,
            N=out_features,
            bits=n.attrs["bits"],
            block_size=n.attrs["block"],
            accuracy_level=ACCURACY_LEVEL,
        )
        return
    if len(n.inputs) == 3:  # FP8: weight stored [in, out], scales [in / 128, out]
        weight = _dequantize(t, weight, t.owned("linear_scale_t"), axis=0)
    t.result("MatMul", [ins[0], weight])


def _head_linear(t: Tape, n: Node, ins: list[str]) -> None:
    # x[..., H, in] -> [..., H, 1, in] @ w[H, in, out] -> [..., H, 1, out] -> [..., H, out]
    x = t.op("Unsqueeze", [ins[0], t.i64([-2])])
    y = t.op("MatMul", [x, ins[1]])
    t.result("Squeeze", [y, t.i64([-2])])


def _rms_norm(t: Tape, n: Node, ins: list[str]) -> None:
    x, w = ins
    sq = t.op("Pow", [x, t.f32(2.0)])  # Pow, not Mul: onnxruntime fuses this RMSNorm form
    ms = t.op("ReduceMean", [sq, t.i64([-1])], keepdims=1)
    denom = t.op("Sqrt", [t.op("Add", [ms, t.f32(n.attrs["eps"])])])
    t.result("Mul", [t.op("Div", [x, denom]), w])


def _rotation(half: int, interleaved: bool) -> np.ndarray:
    """R with x @ R = the rotated partner of every element: (-x[2i+1], x[2i]) per pair when interleaved (DeepSeek),
    (-x[i+h], x[i]) in rotate_half order otherwise. Entries are 0 and +-1, so the product is exact."""
    r = np.zeros((2 * half, 2 * half), dtype=np.float32)
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        r[b, a], r[a, b] = -1.0, 1.0
    return r


def _rope(t: Tape, n: Node, ins: list[str]) -> None:
    """One MatMul per rope: x @ M with M[b, s] = diag(cos) + R diag(sin) ([b, s, d, d], two non-zeros per column,
    so each output is the same two products as x * cos + (x @ R) * sin). M is built once per graph and shared by
    every rope of the same positions and frequencies: one kernel per rope instead of four."""
    x, pos = ins
    a, rank = n.attrs, n.inputs[0].type.rank

    def rotation() -> str:
        inv = np.repeat(a["inv_freq"], 2) if a["interleaved"] else np.tile(a["inv_freq"], 2)
        posf = t.op("Unsqueeze", [t.op("Cast", [pos], to=TensorProto.FLOAT), t.i64([-1])])
        freqs = t.op("Mul", [posf, t.f32(inv, "inv_freq")])  # [b, s, d]
        cos, sin = t.op("Cos", [freqs]), t.op("Sin", [freqs])
        if a["scaling"] != 1.0:
            cos = t.op("Mul", [cos, t.f32(a["scaling"])])
            sin = t.op("Mul", [sin, t.f32(a["scaling"])])
        d = len(inv)
        diag = t.op("Mul", [t.op("Unsqueeze", [cos, t.i64([-2])]), t.f32(np.eye(d), "rope_identity")])
        turn = t.op(
            "Mul", [t.op("Unsqueeze", [sin, t.i64([-2])]), t.f32(_rotation(d // 2, a["interleaved"]), "rope_rotation")]
        )
        return t.op("Add", [diag, turn])  # [b, s, d, d]

    m = t.shared(("rope", pos, a["inv_freq"], a["scaling"], a["interleaved"]), rotation)
    if rank == 4:  # [b, s, H, d] @ [b, s, d, d]
        t.result("MatMul", [x, m])
    else:  # [b, s, d] -> [b, s, 1, d] @ [b, s, d, d] -> [b, s, d]
        t.result("Squeeze", [t.op("MatMul", [t.op("Unsqueeze", [x, t.i64([-2])]), m]), t.i64([-2])])


def _attention(t: Tape, n: Node, ins: list[str]) -> None:
    """Causal attention over the cache (head-major [b, Hk, T, d]) with the padding mask: a hidden score gets the
    lowest finite float (ir/ops.py MASKED_SCORE), so a query with every key hidden stays finite."""
    q, k, v, _ = ins
    heads, kv_heads = n.inputs[0].type.shape[2], n.inputs[1].type.shape[1]
    if kv_heads == 1 and isinstance(heads, int):
        _attention_one_kv_head(t, n, ins, heads)
        return
    qh = t.op("Transpose", [q], perm=[0, 2, 1, 3])  # [b, h, s, d]
    kt = t.op("Transpose", [k], perm=[0, 1, 3, 2])  # onnxruntime folds this into the MatMul (transB)
    scores = t.op("Mul", [t.op("MatMul", [qh, kt]), t.f32(n.attrs["scale"])])
    hidden = _hidden(t, n, ins, rows_per_query=1, mask_axes=[1, 2])  # [b, 1, s, T]
    probs = t.op("Softmax", [t.op("Where", [hidden, t.f32(MASKED_SCORE), scores])], axis=-1)
    t.result("Transpose", [t.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])


def _hidden(t: Tape, n: Node, ins: list[str], rows_per_query: int, mask_axes: list[int]) -> str:
    """True where a score is hidden: key j from query row r (query i = r // rows_per_query) when j > (T - s) + i
    (the cache sits in front of the new tokens), key j is padding (attention_mask 0) or an empty cache slot (ir/ops.py
    EMPTY_SLOT_COLUMNS). Shared by every attention with the same mask input and symbolic (s, T): every layer's cache
    has its empty slots at the same positions (cache_append runs on all layers in one step), so the first
    attention's keys (head 0) stand for all, and the test costs one small slice per step."""
    q, k, _, mask = ins

    def build() -> str:
        s_len = t.op("Gather", [t.op("Shape", [q]), t.i64(1)], axis=0)
        t_len = t.op("Gather", [t.op("Shape", [k]), t.i64(2)], axis=0)
        zero, one = t.i64(0), t.i64(1)
        query = t.op("Range", [zero, t.op("Mul", [s_len, t.i64(rows_per_query)]), one])
        if rows_per_query > 1:
            query = t.op("Div", [query, t.i64(rows_per_query)])
        limit = t.op("Add", [query, t.op("Sub", [t_len, s_len])])
        causal = t.op("Greater", [t.op("Range", [zero, t_len, one]), t.op("Unsqueeze", [limit, t.i64([1])])])
        padding = t.op("Unsqueeze", [t.op("Equal", [mask, t.i64(0)]), t.i64(mask_axes)])
        head0 = t.op("Slice", [k, t.i64([0, 0]), t.i64([1, EMPTY_SLOT_COLUMNS]), t.i64([1, 3])])  # [b, 1, T, c]
        # |x| as Max(x, -x) and a or b as not(not a and not b): TensorRT's ONNX parser has neither Abs nor Or
        magnitude = t.op("Max", [head0, t.op("Neg", [head0])])
        largest = t.op("ReduceMax", [magnitude, t.i64([-1])], keepdims=0)  # [b, 1, T]
        empty = t.op("Equal", [largest, t.f32(0.0)])
        if len(mask_axes) == 2:  # scores [b, h, s, T]
            empty = t.op("Unsqueeze", [empty, t.i64([2])])
        shown = t.op("And", [t.op("Not", [causal]), t.op("Not", [padding])])
        return t.op("Not", [t.op("And", [shown, t.op("Not", [empty])])])

    key = ("hidden", mask, rows_per_query, n.inputs[0].type.shape[1], n.inputs[1].type.shape[2])
    return t.shared(key, build)


def _attention_one_kv_head(t: Tape, n: Node, ins: list[str], heads: int) -> None:
    """Multi-query attention (one key/value head: MLA's absorbed latent) without transposes: the query heads of
    every new token are rows of one [b, s*H, d] matrix against keys [b, T, d], so the cache is read in place.
    ``joint_kv`` (the latent as key and value halves): keys = values = [k | v], computed as two products per
    half and summed (scores) or concatenated (outputs), which never copies the cache into one row."""
    q, k, v, _ = ins
    dq, dk, dv = n.inputs[0].type.shape[3], n.inputs[1].type.shape[3], n.inputs[2].type.shape[3]
    rows = t.op("Reshape", [q, t.i64([0, -1, dq])])  # [b, s*H, dq]
    keys = t.op("Reshape", [k, t.i64([0, -1, dk])])  # [b, T, dk]
    values = keys if v == k else t.op("Reshape", [v, t.i64([0, -1, dv])])
    scale = t.f32(n.attrs["scale"])
    if n.attrs.get("joint_kv"):
        if dq < 2 * dk:  # an odd latent's zero column
            rows = t.op("Pad", [rows, t.i64([0, 0, 0, 0, 0, 2 * dk - dq])])
        q_k, q_v = t.op_multi("Split", [rows, t.i64([dk, dk])], 2, axis=-1)
        scores = t.op(
            "Add",
            [
                t.op("MatMul", [q_k, t.op("Transpose", [keys], perm=[0, 2, 1])]),
                t.op("MatMul", [q_v, t.op("Transpose", [values], perm=[0, 2, 1])]),
            ],
        )
        dv = 2 * dk
    else:
        # onnxruntime folds the transpose into the MatMul (FusedMatMul transB)
        scores = t.op("MatMul", [rows, t.op("Transpose", [keys], perm=[0, 2, 1])])
    scores = t.op("Mul", [scores, scale])
    hidden = _hidden(t, n, ins, rows_per_query=heads, mask_axes=[1])  # [b, s*H, T]
    probs = t.op("Softmax", [t.op("Where", [hidden, t.f32(MASKED_SCORE), scores])], axis=-1)
    if n.attrs.get("joint_kv"):
        out = t.op("Concat", [t.op("MatMul", [probs, keys]), t.op("MatMul", [probs, values])], axis=-1)
    else:
        out = t.op("MatMul", [probs, values])
    t.result("Reshape", [out, t.i64([0, -1, heads, dv])])


# -- DeepSeek-V3.2 sparse attention (DSA, DESIGN.md §9): the indexer, then attention over the selected rows ----
def _query_positions(t: Tape, q: str, k: str, seq_axis: int = 1) -> str:
    """[s, 1] int64: the absolute position of each new token, the cache in front (T - s + i)."""
    s_len = t.op("Gather", [t.op("Shape", [q]), t.i64(1)], axis=0)
    t_len = t.op("Gather", [t.op("Shape", [k]), t.i64(seq_axis)], axis=0)
    rows = t.op("Add", [t.op("Range", [t.i64(0), s_len, t.i64(1)]), t.op("Sub", [t_len, s_len])])
    return t.op("Unsqueeze", [rows, t.i64([1])])


def _index_topk(t: Tape, n: Node, ins: list[str]) -> None:
    """The lightning indexer: O(T) per query, the only part of DSA that reads the whole context. Scores
    sum_h w[h] relu(q[h] . k) as two MatMuls ([b,s,H,d] @ [b,1,d,T], then [b,s,1,H] @ [b,s,H,T]), later keys at
    -inf, then TopK of min(top_k, T) with ONNX's tie rule (equal scores: lower position first, the interpreter's
    too). Padded keys (attention_mask [b, T] 0) get -inf as later keys do, so they are never selected before a
    real key. The keys are the head-major indexer cache [b, 1, T, d]."""
    q, k, w, mask = ins
    a = n.attrs
    # Transpose right into the MatMul: onnxruntime fuses it (FusedMatMul transB) and reads the cache in place
    keys_t = t.op("Transpose", [k], perm=[0, 1, 3, 2])  # [b, 1, d, T]
    dots = t.op("Relu", [t.op("Mul", [t.op("MatMul", [q, keys_t]), t.f32(a["scale"])])])  # [b, s, H, T]
    heads = t.op("Unsqueeze", [t.op("Mul", [w, t.f32(a["weight_scale"])]), t.i64([2])])  # [b, s, 1, H]
    scores = t.op("Squeeze", [t.op("MatMul", [heads, dots]), t.i64([2])])  # [b, s, T]
    positions = t.op("Range", [t.i64(0), t.op("Gather", [t.op("Shape", [k]), t.i64(2)], axis=0), t.i64(1)])
    future = t.op("Greater", [positions, _query_positions(t, q, k, seq_axis=2)])  # [s, T]
    padding = t.op("Unsqueeze", [t.op("Equal", [mask, t.i64(0)]), t.i64([1])])  # [b, 1, T]
    scores = t.op("Where", [future, t.f32(-np.inf), scores])
    scores = t.op("Where", [padding, t.f32(-np.inf), scores])
    t_len = t.op("Slice", [t.op("Shape", [k]), t.i64([2]), t.i64([3])])
    if t.moe_lowering == "gather":
        # The standard-ops (TensorRT) flavour: TensorRT wants TopK's K a build-time constant (< 3840, checked by
        # backends/tensorrt_ops.py), so the scores are padded with -inf up to top_k keys. Padding sorts after every
        # real key (ties go lowest position first), so it only appears when every key is selected anyway; the
        # sparse attention clamps and hides positions >= T.
        pad = t.op("Max", [t.op("Sub", [t.i64([a["top_k"]]), t_len]), t.i64([0])])
        grid = t.op("Concat", [t.op("Slice", [t.op("Shape", [scores]), t.i64([0]), t.i64([2])]), pad], axis=0)
        fill = helper.make_tensor("minus_inf", TensorProto.FLOAT, [1], [-np.inf])
        scores = t.op("Concat", [scores, t.op("ConstantOfShape", [grid], value=fill)], axis=-1)
        count = t.i64([a["top_k"]])
    else:
        count = t.op("Min", [t_len, t.i64([a["top_k"]])])
    values = t.e.fresh(f"{n.name}/TopK_values")
    t._emit("TopK", [scores, count], [values, n.output.name], {"axis": -1, "largest": 1, "sorted": 1})


def _in_range(t: Tape, idx: str, k: str) -> str:
    """Selected positions clamped to the keys that exist (the padded static-K selection may name T.. top_k - 1;
    those are hidden as keys after the query, since every query sits at a position < T)."""
    last = t.op("Sub", [t.op("Gather", [t.op("Shape", [k]), t.i64(1)], axis=0), t.i64(1)])
    return t.op("Min", [idx, last])


def _gather_rows(t: Tape, x: str, idx: str, heads: int, dim: int) -> str:
    """Rows ``idx`` [b, s, K] of a cache [b, T, heads, dim] -> [b, s, K, heads, dim]: O(K) per query."""
    idx = _in_range(t, idx, x)
    flat = t.op("Reshape", [x, t.i64([0, 0, -1])])
    rows = t.op("GatherND", [flat, t.op("Unsqueeze", [idx, t.i64([-1])])], batch_dims=1)  # [b, s, K, heads*dim]
    return t.op("Reshape", [rows, t.i64([0, 0, 0, heads, dim])])


def _token_major(t: Tape, n: Node, ins: list[str]) -> tuple[list[str], int, int, int, int]:
    """Sparse attention's inputs as the lowerings below read them: k, v token-major [b, T, Hk, d] (the cache is
    head-major [b, Hk, T, d]), ``joint_kv`` resolved to keys = values = [k | v] (q zero-padded to that width).
    Returns ([q, k, v, mask, idx], heads, kv_heads, dk, dv)."""
    q, k, v, mask, idx = ins
    heads, kv_heads = n.inputs[0].type.shape[2], n.inputs[1].type.shape[1]
    dq, dk, dv = n.inputs[0].type.shape[3], n.inputs[1].type.shape[3], n.inputs[2].type.shape[3]
    if n.attrs.get("joint_kv"):
        k = v = t.op("Concat", [k, v], axis=-1)
        dk = dv = 2 * dk
        if dq < dk:
            q = t.op("Pad", [q, t.i64([0, 0, 0, 0, 0, 0, 0, dk - dq])])
    same = v == k
    k = t.op("Transpose", [k], perm=[0, 2, 1, 3])
    v = k if same else t.op("Transpose", [v], perm=[0, 2, 1, 3])
    return [q, k, v, mask, idx], heads, kv_heads, dk, dv


def _padded_keys(t: Tape, mask: str, idx: str, k: str) -> str:
    """[b, s, K] bool: the selected key is padding (attention_mask 0)."""
    picked = t.op("GatherND", [mask, t.op("Unsqueeze", [_in_range(t, idx, k), t.i64([-1])])], batch_dims=1)
    return t.op("Equal", [picked, t.i64(0)])


def _sparse_gather(t: Tape, n: Node, ins: list[str]) -> str:
    """Attention over the indexer's K selected keys only, gathered first (cost O(K) per query, never a dense
    attention with a mask): queries grouped by kv head [b, s, Hk, H/Hk, dk] @ keys [b, s, Hk, dk, K]. A selected
    key after its query (a prompt row with fewer than K earlier keys) or a padded one stays hidden."""
    (q, k, v, mask, idx), heads, kv_heads, dk, dv = _token_major(t, n, ins)
    future = t.op("Greater", [idx, _query_positions(t, q, k)])  # [b, s, K]
    # a or b as not(not a and not b): TensorRT's ONNX parser has no Or
    future = t.op("Not", [t.op("And", [t.op("Not", [future]), t.op("Not", [_padded_keys(t, mask, idx, k)])])])
    if kv_heads == 1:  # MLA's latent: [b, s, H, dk] @ rows^T [b, s, dk, K], the transpose fused into the MatMul
        keys = t.op("Reshape", [_gather_rows(t, k, idx, 1, dk), t.i64([0, 0, 0, dk])])  # [b, s, K, dk]
        values = keys if v == k else t.op("Reshape", [_gather_rows(t, v, idx, 1, dv), t.i64([0, 0, 0, dv])])
        scores = t.op("MatMul", [q, t.op("Transpose", [keys], perm=[0, 1, 3, 2])])  # [b, s, H, K]
        scores = t.op("Mul", [scores, t.f32(n.attrs["scale"])])
        hidden = t.op("Unsqueeze", [future, t.i64([2])])
        probs = t.op("Softmax", [t.op("Where", [hidden, t.f32(MASKED_SCORE), scores])], axis=-1)
        return t.op("MatMul", [probs, values])  # [b, s, H, dv]
    keys = _gather_rows(t, k, idx, kv_heads, dk)  # [b, s, K, Hk, dk]
    values = keys if v == k else _gather_rows(t, v, idx, kv_heads, dv)
    grouped = t.op("Reshape", [q, t.i64([0, 0, kv_heads, heads // kv_heads, dk])])
    scores = t.op("MatMul", [grouped, t.op("Transpose", [keys], perm=[0, 1, 3, 4, 2])])  # [b, s, Hk, G, K]
    scores = t.op("Mul", [scores, t.f32(n.attrs["scale"])])
    future = t.op("Unsqueeze", [future, t.i64([2, 3])])
    probs = t.op("Softmax", [t.op("Where", [future, t.f32(MASKED_SCORE), scores])], axis=-1)
    out = t.op("MatMul", [probs, t.op("Transpose", [values], perm=[0, 1, 3, 2, 4])])  # [b, s, Hk, G, dv]
    return t.op("Reshape", [out, t.i64([0, 0, heads, dv])])


def _sparse_mask(t: Tape, n: Node, ins: list[str]) -> str:
    """The prefill form: dense scores [b, s, H, T] with every key outside the selection (or after its query)
    (or after its query, or padding) hidden. Memory O(s T H) like dense attention, where gathering holds O(s K dk)
    rows (measured in README)."""
    (q, k, v, mask, idx), heads, kv_heads, dk, dv = _token_major(t, n, ins)
    t_len = t.op("Slice", [t.op("Shape", [k]), t.i64([1]), t.i64([2])])
    grid = t.op("Concat", [t.op("Slice", [t.op("Shape", [idx]), t.i64([0]), t.i64([2])]), t_len], axis=0)
    chosen = t.op(
        "ScatterElements",
        [t.op("ConstantOfShape", [grid]), _in_range(t, idx, k), t.op("Expand", [t.f32(1.0), t.op("Shape", [idx])])],
        axis=-1,
    )
    positions = t.op("Range", [t.i64(0), t.op("Squeeze", [t_len, t.i64([0])]), t.i64(1)])
    future = t.op("Greater", [positions, _query_positions(t, q, k)])  # [s, T]
    hidden = t.op("Or", [t.op("Equal", [chosen, t.f32(0.0)]), future])  # [b, s, T]
    hidden = t.op("Or", [hidden, t.op("Unsqueeze", [t.op("Equal", [mask, t.i64(0)]), t.i64([1])])])
    if kv_heads == 1:  # rows (query, head) against the cache in place, as the one-kv-head dense attention
        rows = t.op("Reshape", [q, t.i64([0, -1, dk])])
        keys = t.op("Reshape", [k, t.i64([0, -1, dk])])
        values = keys if v == k else t.op("Reshape", [v, t.i64([0, -1, dv])])
        scores = t.op("MatMul", [rows, t.op("Transpose", [keys], perm=[0, 2, 1])])  # [b, s*H, T]
        by_head = t.op("Concat", [t.i64([0, -1, heads]), t_len], axis=0)  # [b, s, H, T]
        scores = t.op("Reshape", [t.op("Mul", [scores, t.f32(n.attrs["scale"])]), by_head])
        hidden = t.op("Unsqueeze", [hidden, t.i64([2])])  # [b, s, 1, T]
        probs = t.op("Softmax", [t.op("Where", [hidden, t.f32(MASKED_SCORE), scores])], axis=-1)
        flat = t.op("Reshape", [probs, t.op("Concat", [t.i64([0, -1]), t_len], axis=0)])  # [b, s*H, T]
        out = t.op("MatMul", [flat, values])  # [b, s*H, dv]
        return t.op("Reshape", [out, t.i64([0, -1, heads, dv])])
    qh = t.op("Transpose", [q], perm=[0, 2, 1, 3])  # [b, H, s, d]
    kt = t.op("Transpose", [k], perm=[0, 2, 3, 1])  # [b, H, d, T]
    vh = t.op("Transpose", [v], perm=[0, 2, 1, 3])
    scores = t.op("Mul", [t.op("MatMul", [qh, kt]), t.f32(n.attrs["scale"])])
    hidden = t.op("Unsqueeze", [hidden, t.i64([1])])  # [b, 1, s, T]
    probs = t.op("Softmax", [t.op("Where", [hidden, t.f32(MASKED_SCORE), scores])], axis=-1)
    return t.op("Transpose", [t.op("MatMul", [probs, vh])], perm=[0, 2, 1, 3])


# The prefill form of DSA's attention (decode, one new token, always gathers): "mask" or "gather", chosen by
# benchmarks/bench_dsa.py --prefill-forms (README, DeepSeek-V3.2) and recorded in the manifest.
SPARSE_PREFILL = "mask"
SPARSE_FORMS = {"gather": _sparse_gather, "mask": _sparse_mask}


def _branch(t: Tape, name: str, build: Callable[[], str]) -> onnx.GraphProto:
    """A subgraph of an If: the nodes ``build`` emits (reading outer values by name), its result as output."""
    outer, t.e.nodes = t.e.nodes, []
    try:
        result = build()
        nodes = t.e.nodes
    finally:
        t.e.nodes = outer
    out = helper.make_tensor_value_info(result, TensorProto.FLOAT, None)
    return helper.make_graph(nodes, t.e.fresh(f"{t.node.name}/{name}"), [], [out])


def _sparse_attention(t: Tape, n: Node, ins: list[str]) -> None:
    """One new token (decode): gather the selected rows. More (prefill): the measured SPARSE_PREFILL form."""
    if SPARSE_PREFILL == "gather":
        t.result("Identity", [_sparse_gather(t, n, ins)])
        return
    s_len = t.op("Gather", [t.op("Shape", [ins[0]]), t.i64(1)], axis=0)
    decode = t.op("Equal", [s_len, t.i64(1)])
    t.result(
        "If",
        [decode],
        then_branch=_branch(t, "decode_gather", lambda: _sparse_gather(t, n, ins)),
        else_branch=_branch(t, f"prefill_{SPARSE_PREFILL}", lambda: SPARSE_FORMS[SPARSE_PREFILL](t, n, ins)),
    )


def _layer_norm(t: Tape, n: Node, ins: list[str]) -> None:
    t.result("LayerNormalization", ins, axis=-1, epsilon=n.attrs["eps"])


def _kth_largest(t: Tape, x: str, k: int, axis: int) -> str:
    """The k-th largest value of ``x`` along ``axis`` (kept as a size-1 axis): with ``it <= x`` (LessOrEqual, which
    TensorRT parses, unlike GreaterOrEqual), a top-k mask in
    three kernels instead of a scatter of TopK's indices. An exact tie at the k-th value keeps every tied entry
    (the reference's topk would keep one of them arbitrarily; with real-valued scores ties do not occur)."""
    values, _ = t.op_multi("TopK", [x, t.i64([k])], 2, axis=axis)
    return t.op("Slice", [values, t.i64([k - 1]), t.i64([k]), t.i64([axis])])


def _keep_top_groups(t: Tape, n: Node, choice: str) -> str:
    """Group-limited routing: only the experts of the ``topk_group`` best groups stay candidates (the others get
    -inf for noaux_tc, 0 for group_limited_greedy, as DeepSeek's reference does)."""
    a = n.attrs
    groups, per_group = a["n_group"], a["num_experts"] // a["n_group"]
    grouped = t.op("Reshape", [choice, t.i64([0, 0, groups, per_group])])
    if a["method"] == "noaux_tc":  # a group scores the sum of its two best experts
        top2, _ = t.op_multi("TopK", [grouped, t.i64([2])], 2, axis=-1)
        group_scores = t.op("ReduceSum", [top2, t.i64([-1])], keepdims=1)  # [b, s, G, 1]
    else:
        group_scores = t.op("ReduceMax", [grouped, t.i64([-1])], keepdims=1)
    keep = t.op("LessOrEqual", [_kth_largest(t, group_scores, a["topk_group"], axis=-2), group_scores])
    fill = t.f32(-np.inf if a["method"] == "noaux_tc" else 0.0)
    return t.op("Reshape", [t.op("Where", [keep, grouped, fill]), t.i64([0, 0, a["num_experts"]])])


def _moe_route(t: Tape, n: Node, ins: list[str]) -> None:
    a = n.attrs
    logits = t.op("MatMul", [ins[0], ins[1]])  # gate stored [H, E]
    scores = t.op("Sigmoid", [logits]) if a["scoring"] == "sigmoid" else t.op("Softmax", [logits], axis=-1)
    choice = t.op("Add", [scores, ins[2]]) if len(ins) > 2 else scores  # the bias steers choice, not weight
    if a["method"] in ("noaux_tc", "group_limited_greedy") and a["n_group"] > 1:
        choice = _keep_top_groups(t, n, choice)
    # The dense selection scores and mixing scores, for an experts kernel that routes itself (QMoE); the
    # TopK below is then dead in the ONNX graph and dropped.
    t.shared(("route", n.outputs[0].name), lambda: (choice, scores, a))
    _, experts = t.op_multi("TopK", [choice, t.i64([a["top_k"]])], 2, axis=-1)
    weights = t.op("GatherElements", [scores, experts], axis=-1)
    if a["norm_topk_prob"] and a["top_k"] > 1:
        total = t.op("ReduceSum", [weights, t.i64([-1])], keepdims=1)
        weights = t.op("Div", [weights, t.op("Add", [total, t.f32(1e-20)])])
    t.result("Mul", [weights, t.f32(a["scaling"])], outputs=n.outputs[:1])
    t.result("Identity", [experts], outputs=n.outputs[1:])


def _scatter_dense(t: Tape, lead: str, experts: str, weights: str, n_exp: int) -> str:
    """Routing weights [..., k] scattered to [..., E] (0 for experts not chosen); ``lead`` is the shape of ``...``."""
    zeros = t.op("ConstantOfShape", [t.op("Concat", [lead, t.i64([n_exp])], axis=0)], value=_ZERO)
    return t.op("ScatterElements", [zeros, experts, weights], axis=-1)


def _moe_combine(t: Tape, n: Node, ins: list[str]) -> None:
    w, idx, ys = ins[0], ins[1], ins[2:]
    lead = t.op("Slice", [t.op("Shape", [w]), t.i64([0]), t.i64([-1])])
    dense = _scatter_dense(t, lead, idx, w, n.attrs["num_experts"])  # [b, s, E]
    stacked = t.op("Concat", [t.op("Unsqueeze", [y, t.i64([-2])]) for y in ys], axis=-2)
    mixed = t.op("MatMul", [t.op("Unsqueeze", [dense, t.i64([-2])]), stacked])
    t.result("Squeeze", [mixed, t.i64([-2])])


def _moe_experts(t: Tape, n: Node, ins: list[str]) -> None:
    """Routed experts, computing only the chosen ones (see ``MOE_LOWERINGS``)."""
    MOE_LOWERINGS[t.moe_lowering](t, n, ins)


def _flat_routing(t: Tape, n: Node, ins: list[str]) -> tuple[str, str, str, str]:
    """x as [tokens, H], routing weights and experts as [tokens, k], and the original shape of x."""
    x, w, idx = ins[:3]
    hidden, k = n.inputs[0].type.shape[-1], n.inputs[1].type.shape[-1]
    shape = t.op("Shape", [x])
    return (
        t.op("Reshape", [x, t.i64([-1, hidden])]),
        t.op("Reshape", [w, t.i64([-1, k])]),
        t.op("Reshape", [idx, t.i64([-1, k])]),
        shape,
    )


_SWIGLU = dict(
    domain="com.microsoft",
    activation_type="swiglu",
    swiglu_fusion=1,
    activation_alpha=1.0,
    activation_beta=0.0,
    swiglu_limit=1e30,
)


def _experts_kernel(
    t: Tape, n: Node, x: str, probs: str, k: int, normalize: int = 0, router_weights: str | None = None
) -> str:
    """The node's experts in one com.microsoft kernel: QMoE for int weights (fc1 [E, 2I, H*bits/8] with gate and up
    rows interleaved, scales [E, 2I, H/block]; fc2 likewise), else MoE (float32, or FP8 dequantized with per-row
    block scales along the input axis). ``router_weights`` (QMoE only) separates mixing from selection."""
    attrs = dict(k=k, normalize_routing_weights=normalize, **_SWIGLU)
    if _is_int(n):
        a = n.attrs
        inputs = [x, probs, t.owned("q_glu"), t.owned("q_glu_scale"), "", t.owned("q_down"), t.owned("q_down_scale")]
        if router_weights is not None:
            inputs += [""] * 7 + [router_weights]
        return t.op(
            "QMoE",
            inputs,
            expert_weight_bits=a["bits"],
            block_size=a["block"],
            accuracy_level=ACCURACY_LEVEL,
            **attrs,
        )
    assert router_weights is None, "onnxruntime's float MoE kernel has no router_weights input"
    fc1, fc2 = t.owned("glu_interleaved"), t.owned("down")
    if len(n.inputs) > 6:  # FP8 experts
        fc1 = _dequantize(t, fc1, t.owned("glu_interleaved_scale"), axis=2)
        fc2 = _dequantize(t, fc2, t.owned("down_scale"), axis=2)
    return t.op("MoE", [x, probs, fc1, "", fc2], **attrs)


def _moe_contrib(t: Tape, n: Node, ins: list[str]) -> None:
    """onnxruntime's com.microsoft MoE / QMoE kernel (CPU: interleaved SwiGLU, alpha 1, beta 0 = silu(g) * u).

    Fed by a router in the same graph, the kernel routes from the router's dense tensors (``_moe_routed``,
    ``_qmoe_routed``). Otherwise (an expert-parallel rank's experts) it gets the chosen experts and weights: its
    router applies softmax and top-k to the probabilities it is given, so feeding it log(w) scattered over the
    chosen experts (log 0 = -inf elsewhere) makes softmax return w / sum(w) at exactly DeepSeek's choices, and
    multiplying the output by sum(w) restores the weights: routing stays exact (DESIGN.md §8). The kernel takes
    [b, s, H] tokens as they are (only the router rows must be 2-D).
    """
    route = t.e._shared.get(("route", n.inputs[1].name))
    if route is not None:
        return (_qmoe_routed if _is_int(n) else _moe_routed)(t, n, ins, *route)
    x, w, idx = ins[:3]
    lead = t.op("Shape", [w], end=-1)
    dense = _scatter_dense(t, lead, idx, w, n.attrs["num_experts"])
    logits = t.op("Log", [t.op("Reshape", [dense, t.i64([-1, n.attrs["num_experts"]])])])  # rows must be 2-D
    y = _experts_kernel(t, n, x, logits, n.inputs[1].type.shape[-1])
    t.result("Mul", [y, t.op("ReduceSum", [w, t.i64([-1])], keepdims=1)])


def _moe_routed(t: Tape, n: Node, ins: list[str], choice: str, scores: str, route: dict) -> None:
    """The float MoE kernel routed from the router's dense tensors: the top-k mask of the selection scores
    (``_kth_largest``), log(scores) there and -inf elsewhere, so that the kernel's softmax gives the chosen
    experts' scores normalized to sum 1 (DeepSeek's norm_topk_prob; without it the output is multiplied back
    by their sum), then the routed scaling factor. About half the kernels of routing through TopK's indices."""
    keep = t.op("LessOrEqual", [_kth_largest(t, choice, route["top_k"], axis=-1), choice])
    logits = t.op("Where", [keep, t.op("Log", [scores]), t.f32(-np.inf)])
    logits = t.op("Reshape", [logits, t.i64([-1, route["num_experts"]])])  # router rows must be 2-D
    y = _experts_kernel(t, n, ins[0], logits, route["top_k"])
    scale = t.f32(route["scaling"])
    if not (route["norm_topk_prob"] and route["top_k"] > 1):
        total = t.op("ReduceSum", [t.op("Where", [keep, scores, t.f32(0.0)]), t.i64([-1])], keepdims=1)
        scale = t.op("Mul", [total, scale])
    t.result("Mul", [y, scale])


def _qmoe_routed(t: Tape, n: Node, ins: list[str], choice: str, scores: str, route: dict) -> None:
    """QMoE routing by itself from the router's dense tensors (DeepSeek's exact rule, one kernel instead of
    about fifteen): it picks the top-k of ``router_probs`` (the selection scores: bias added, groups masked)
    and mixes with ``router_weights`` (the scores) gathered at the picks, normalized to sum 1 when
    ``normalize_routing_weights``; the routed scaling factor multiplies the output. Tokens stay [b, s, H]; the
    router rows must be 2-D. Checked against the reference by tests/passes/test_int_quantize.py."""
    n_exp = route["num_experts"]
    probs = t.op("Reshape", [choice, t.i64([-1, n_exp])])
    weights = t.op("Reshape", [scores, t.i64([-1, n_exp])])
    normalize = int(route["norm_topk_prob"] and route["top_k"] > 1)
    y = _experts_kernel(t, n, ins[0], probs, route["top_k"], normalize, router_weights=weights)
    if route["scaling"] != 1.0:
        t.result("Mul", [y, t.f32(route["scaling"])])
    else:
        t.result("Identity", [y])


def _moe_gather(t: Tape, n: Node, ins: list[str]) -> None:
    """Standard ops only: gather each token's chosen experts' weights and apply them (batched MatMul).

    Exact and sparse, and what TensorRT can parse; it copies k expert matrices per token, which is cheap for
    decode (one token) and grows with the prompt for prefill."""
    inter = n.inputs[3].type.shape[1]
    x2, w2, idx2, shape = _flat_routing(t, n, ins)
    gate_up_w, down_w = t.owned("gate_up_t"), t.owned("down_t")
    if _is_int(n):  # int levels [E, K, N] with scales [E, K/block, N]: blocks along axis 1
        block = n.attrs["block"]
        gate_up_w = t.op("DequantizeLinear", [gate_up_w, t.owned("gate_up_t_iscale")], axis=1, block_size=block)
        down_w = t.op("DequantizeLinear", [down_w, t.owned("down_t_iscale")], axis=1, block_size=block)
    elif len(n.inputs) > 6:  # FP8 experts: blocks along the input axis (now axis 1)
        gate_up_w = _dequantize(t, gate_up_w, t.owned("gate_up_t_scale"), axis=1)
        down_w = _dequantize(t, down_w, t.owned("down_t_scale"), axis=1)
    gate_up = t.op("Gather", [gate_up_w, idx2], axis=0)  # [T, k, H, 2I]
    down = t.op("Gather", [down_w, idx2], axis=0)  # [T, k, I, H]
    xs = t.op("Unsqueeze", [x2, t.i64([1, 2])])  # [T, 1, 1, H]
    g, u = t.op_multi("Split", [t.op("MatMul", [xs, gate_up]), t.i64([inter, inter])], 2, axis=-1)
    h = t.op("Mul", [t.op("Mul", [g, t.op("Sigmoid", [g])]), u])
    y = t.op("Squeeze", [t.op("MatMul", [h, down]), t.i64([2])])  # [T, k, H]
    y = t.op("Mul", [y, t.op("Unsqueeze", [w2, t.i64([-1])])])
    t.result("Reshape", [t.op("ReduceSum", [y, t.i64([1])], keepdims=0), shape])


MOE_LOWERINGS: dict[str, Callable[[Tape, Node, list[str]], None]] = {"contrib": _moe_contrib, "gather": _moe_gather}


def _simple(op_type: str, *attr_names: str) -> Callable[[Tape, Node, list[str]], None]:
    """An op that is one ONNX node with the same inputs, copying the named IR attributes."""

    def lower(t: Tape, n: Node, ins: list[str]) -> None:
        t.result(op_type, ins, **{k: n.attrs[k] for k in attr_names})

    return lower


def _silu(t: Tape, n: Node, ins: list[str]) -> None:
    t.result("Mul", [ins[0], t.op("Sigmoid", ins)])


def _split(t: Tape, n: Node, ins: list[str]) -> None:
    t.result("Split", [ins[0], t.i64(list(n.attrs["sizes"]))], axis=n.attrs["axis"])


def _reshape(t: Tape, n: Node, ins: list[str]) -> None:
    t.result("Reshape", [ins[0], t.i64(list(n.attrs["shape"]))])  # ONNX's 0 also copies the input dim


def _expand(t: Tape, n: Node, ins: list[str]) -> None:
    shape = [1] * n.inputs[0].type.rank
    shape[n.attrs["axis"]] = n.attrs["size"]
    t.result("Expand", [ins[0], t.i64(shape)])


def _cache_append(t: Tape, n: Node, ins: list[str]) -> None:
    """Concat(past, zeros for the slots the mask has beyond past + new, new) along the sequence axis; the zeros are
    empty (size 0) in every step but the one after onnxruntime-genai's un-run sampled token. Every layer's cache
    has the same past and new lengths, so one zeros tensor per cache shape serves all layers."""
    past, new, mask = ins

    def zeros() -> str:
        dims = t.op("Shape", [new])  # [b, h, S, d]
        total = t.op("Shape", [mask], start=1, end=2)
        seen = t.op("Add", [t.op("Shape", [past], start=2, end=3), t.op("Shape", [new], start=2, end=3)])
        lead, tail = t.op("Slice", [dims, t.i64([0]), t.i64([2])]), t.op("Slice", [dims, t.i64([3]), t.i64([4])])
        shape = t.op("Concat", [lead, t.op("Sub", [total, seen]), tail], axis=0)
        return t.op("ConstantOfShape", [shape], value=_ZERO)

    key = ("cache_gap", mask, n.inputs[0].type.shape, n.inputs[1].type.shape)
    t.result("Concat", [past, t.shared(key, zeros), new], axis=2)


def _transpose(t: Tape, n: Node, ins: list[str]) -> None:
    t.result("Transpose", [ins[0]], perm=list(n.attrs["perm"]))


def _pad(t: Tape, n: Node, ins: list[str]) -> None:
    rank = n.inputs[0].type.rank
    t.result("Pad", [ins[0], t.i64([0] * (2 * rank - 1) + [n.attrs["after"]])])


def _embedding(t: Tape, n: Node, ins: list[str]) -> None:
    if _is_int(n):  # com.microsoft GatherBlockQuantized: uint8 rows [V, H*bits/8], scales [V, H/block]
        t.result(
            "GatherBlockQuantized",
            [t.owned("gbq"), ins[0], t.owned("gbq_scale")],
            domain="com.microsoft",
            bits=n.attrs["bits"],
            block_size=n.attrs["block"],
            gather_axis=0,
            quantize_axis=1,
        )
        return
    t.result("Gather", [ins[1], ins[0]], axis=0)


# -- weights that lowerings lay out themselves ----------------------------------------------------------
def _per_expert(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Apply a layout transform expert by expert into one preallocated tensor, so that building a layer's
    stacked initializer holds the result plus one expert, not several stacked copies."""

    def build(*sources) -> torch.Tensor:
        if not all(isinstance(s, Stacked) for s in sources):
            return fn(*(s.load() for s in sources)).contiguous()
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


def _row_scales(weights: Layout, scale_inputs: tuple[int, ...]) -> Layout:  # FP8 only
    """The block scales of ``weights``' inputs, repeated to one per row and laid out like the weights, so that
    DequantizeLinear blocks along the input axis only."""

    def build(n: Node, *scales: torch.Tensor) -> torch.Tensor:
        rows = (n.inputs[i].type.shape[-2] for i in weights.inputs)
        return weights.build(n, *(_rows(s, r) for s, r in zip(scales, rows, strict=True)))

    return Layout(scale_inputs, build, when=_is_fp8)


def _glu_interleaved(n: Node, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.stack([gate, up], dim=2).flatten(1, 2)  # rows g0, u0, g1, u1, ...


def pack_nbits(q: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """int levels [..., N, K] as MatMulNBits / QMoE store them: uint8 [..., N, ceil(K/block), block*bits/8],
    level + 2^(bits-1) (the default zero point), 4-bit pairs low nibble first, a partial last block padded
    with the zero point."""
    zero = 1 << (bits - 1)
    k = q.shape[-1]
    nb = -(-k // block)
    u = (q.to(torch.int16) + zero).to(torch.uint8)
    if nb * block != k:
        fill = torch.full((*u.shape[:-1], nb * block - k), zero, dtype=torch.uint8, device=u.device)
        u = torch.cat([u, fill], dim=-1)
    u = u.unflatten(-1, (nb, block))
    if bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return u.contiguous()


def _flat_nbits(n: Node, q: torch.Tensor) -> torch.Tensor:
    """QMoE's weight layout: the packed blocks of each row flattened, [E, N, K*bits/8]."""
    return pack_nbits(q, n.attrs["bits"], n.attrs["block"]).flatten(-2)


_LINEAR_T = Layout((1,), lambda n, w: w.transpose(-1, -2))  # what the generic writer does to a transposed input
# onnxruntime's MoE kernel takes fc1 [E, 2I, H] with gate and up rows interleaved, fc2 [E, H, I] as stored.
_GLU = Layout((3, 4), _glu_interleaved)
_DOWN = Layout((5,), lambda n, d: d)
# The gather lowering multiplies x @ w: [E, H, 2I] (gate then up) and [E, I, H].
_GATE_UP_T = Layout((3, 4), lambda n, g, u: torch.cat([g, u], dim=1).transpose(1, 2))
_DOWN_T = Layout((5,), lambda n, d: d.transpose(1, 2))
# int weights (int-quantize): MatMulNBits' packed B and [N, K/block] scales as stored; QMoE's fc1 / fc2 packed
# and flattened per row, their scales laid out like the rows; the gather lowering's scales transposed like its
# weights, for DequantizeLinear along axis 1.
_NBITS = Layout((1,), lambda n, q: pack_nbits(q, n.attrs["bits"], n.attrs["block"]), when=_is_int)
_NBITS_SCALE = Layout((2,), lambda n, s: s, when=_is_int)
_GBQ = Layout((1,), _flat_nbits, when=_is_int)  # whole blocks per row: the rows' packed bytes, [V, H*bits/8]
_Q_GLU = Layout((3, 4), lambda n, g, u: _flat_nbits(n, _glu_interleaved(n, g, u)), when=_is_int)
_Q_GLU_SCALE = Layout((6, 7), _glu_interleaved, when=_is_int)
_Q_DOWN = Layout((5,), _flat_nbits, when=_is_int)
_Q_DOWN_SCALE = Layout((8,), lambda n, s: s, when=_is_int)
_GATE_UP_T_ISCALE = Layout((6, 7), _GATE_UP_T.build, when=_is_int)
_DOWN_T_ISCALE = Layout((8,), _DOWN_T.build, when=_is_int)

# -- the table ------------------------------------------------------------------------------------------
LOWERINGS: dict[Op, Lowering] = {
    r.op: r
    for r in (
        Lowering(Op.EMBEDDING, _embedding, layouts={"gbq": _GBQ, "gbq_scale": _NBITS_SCALE}),
        Lowering(
            Op.LINEAR,
            _linear,
            transposed=(1,),
            layouts={
                "linear_scale_t": _row_scales(_LINEAR_T, (2,)),
                "nbits": _NBITS,
                "nbits_scale": _NBITS_SCALE,
            },
        ),
        Lowering(Op.HEAD_LINEAR, _head_linear, transposed=(1,)),
        Lowering(Op.RMS_NORM, _rms_norm),
        Lowering(Op.ROPE, _rope),
        Lowering(Op.ATTENTION, _attention),
        Lowering(Op.INDEX_TOPK, _index_topk),
        Lowering(Op.SPARSE_ATTENTION, _sparse_attention),
        Lowering(Op.LAYER_NORM, _layer_norm),
        Lowering(Op.ADD, _simple("Add")),
        Lowering(Op.MUL, _simple("Mul")),
        Lowering(Op.SILU, _silu),
        Lowering(Op.SPLIT, _split),
        Lowering(Op.CONCAT, _simple("Concat", "axis")),
        Lowering(Op.RESHAPE, _reshape),
        Lowering(Op.EXPAND, _expand),
        Lowering(Op.TRANSPOSE, _transpose),
        Lowering(Op.CACHE_APPEND, _cache_append),
        Lowering(Op.PAD, _pad),
        Lowering(Op.MOE_ROUTE, _moe_route, transposed=(1,)),
        Lowering(Op.MOE_COMBINE, _moe_combine),
        Lowering(
            Op.MOE_EXPERTS,
            _moe_experts,
            layouts={
                "glu_interleaved": _GLU,
                "glu_interleaved_scale": _row_scales(_GLU, (6, 7)),
                "down": _DOWN,
                "down_scale": _row_scales(_DOWN, (8,)),
                "gate_up_t": _GATE_UP_T,
                "gate_up_t_scale": _row_scales(_GATE_UP_T, (6, 7)),
                "down_t": _DOWN_T,
                "down_t_scale": _row_scales(_DOWN_T, (8,)),
                "q_glu": _Q_GLU,
                "q_glu_scale": _Q_GLU_SCALE,
                "q_down": _Q_DOWN,
                "q_down_scale": _Q_DOWN_SCALE,
                "gate_up_t_iscale": _GATE_UP_T_ISCALE,
                "down_t_iscale": _DOWN_T_ISCALE,
            },
        ),
    )
}


def _weight_initializers(e: _Emitter) -> dict[tuple[str, str], str]:
    """Declare every weight the lowerings read as is ("N") or transposed ("T"), in the graph's weight order; a
    weight needed both ways is stored twice, the transposed copy as ``{name}.T``. Returns (weight, layout) ->
    initializer name."""
    graph = e.graph
    layouts: dict[str, set[str]] = {}
    for node in graph.nodes:
        rec = LOWERINGS[node.op]
        for i, v in enumerate(node.inputs):
            if v.name in graph.weights and i not in rec.owned(node):
                layouts.setdefault(v.name, set()).add("T" if i in rec.transposed else "N")
    names: dict[tuple[str, str], str] = {}
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
            names[(name, layout)] = init.name
            e.initializers.append(init)
    return names


def _drop_dead_nodes(e: _Emitter, outputs: list[str]) -> None:
    """Remove ONNX nodes nothing reads (say, a router's TopK when QMoE routes by itself) and the constants and
    initializers only they used."""
    live = set(outputs)
    kept = []
    for node in reversed(e.nodes):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(node.input)
            for attr in node.attribute:  # an If's branches read outer values by name
                if attr.type == onnx.AttributeProto.GRAPH:
                    live.update(name for inner in attr.g.node for name in inner.input)
    e.nodes = kept[::-1]
    e.initializers = [i for i in e.initializers if i.name in live]


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
    weight_names = _weight_initializers(e)
    for node in graph.nodes:
        rec = LOWERINGS[node.op]
        ins = []
        owned = rec.owned(node)
        for i, v in enumerate(node.inputs):
            if i in owned:
                ins.append("")  # laid out by the lowering itself (Tape.owned)
            elif v.name in graph.weights:
                ins.append(weight_names[(v.name, "T" if i in rec.transposed else "N")])
            else:
                ins.append(v.name)
        rec.lower(Tape(e, node, rec), node, ins)
    produced = {name for nd in e.nodes for name in nd.output}
    missing = [v.name for nd in graph.nodes for v in nd.outputs if v.name not in produced]
    assert not missing, f"lowerings left IR values unwritten (a lowering must end with Tape.result): {missing[:5]}"
    _drop_dead_nodes(e, [v.name for v in graph.outputs])
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
