"""The ONNX subset TensorRT's ONNX parser accepts, kept for the ops and dtypes dsc emits (DESIGN.md §8).

Taken from onnx-tensorrt's operator support matrix (``SOURCE``): the header of the TensorRT 10.15 revision
reads "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"; the 10.0/10.1
revisions (branch 10.1-GA) read "opset 9 to opset 20" and list the same rows below except where later releases
widened them (FP8/FP4 ConstantOfShape, integer Pow, FP4 DequantizeLinear; Slice's axes had to be an
initializer until 10.3, which is still checked). Only the rows dsc emits, or may plausibly emit next, are kept;
the restrictions column is turned into checks where dsc can meet it statically. Update ``TENSORRT_VERSION``
together with the rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TENSORRT_VERSION = "10.15"
SOURCE = "onnx-tensorrt docs/operators.md, TensorRT 10.15 revision (opset 9 to 24)"
SOURCE_URL = "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md"
OPSET_RANGE = (9, 24)  # TensorRT 10.15; 10.0 and 10.1 stop at opset 20
TOPK_MAX_K = 3839  # "K input must be less than 3840"
# Blocked DequantizeLinear (NvInfer.h, IDequantizeLayer): INT4 only through TensorRT 10.12; FP8/FP4 blocks from
# 10.13, the scale of rank <= 2 and rooted at a constant; onnx-tensorrt's importer infers the block size as input
# dim / scale dim (ignoring ``block_size``), so only whole blocks are dequantized as written.
FP8_BLOCKS_SINCE = (10, 13)

_F = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
_FI = _F | {TensorProto.INT32, TensorProto.INT64}
_FIB = _FI | {TensorProto.BOOL}
_QUANTIZED = frozenset({TensorProto.FLOAT8E4M3FN, TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT4E2M1})

# The "TensorRT supports the following ONNX data types" line, less DOUBLE (only cast down, never emitted).
# Quantized types are legal only as DequantizeLinear inputs and QuantizeLinear outputs; UINT8 only as network
# input or output (the notes under that line).
TENSOR_DTYPES = _FIB | {TensorProto.UINT8} | _QUANTIZED

# op type -> the types of its data input ("Supported Types" column).
OP_TYPES: dict[str, frozenset[int]] = {
    "Add": _FI,
    "And": frozenset({TensorProto.BOOL}),
    "Cast": _FIB | {TensorProto.UINT8},
    "Concat": _FIB,
    "ConstantOfShape": _FIB | (_QUANTIZED - {TensorProto.INT8}),
    "Cos": _F,
    "DequantizeLinear": _QUANTIZED,  # x_zero_point must be zero
    "Div": _FI,
    "Einsum": _F,
    "Equal": _FI,
    "Exp": _F,
    "Expand": _FIB,
    "Gather": _FIB,
    "GatherElements": _FIB,
    "GatherND": _FIB,
    "Greater": _FI,
    "Identity": _FIB,
    "If": frozenset({TensorProto.BOOL}),  # DSA: decode (gather) vs prefill branch; outputs broadcastable
    "LayerNormalization": _F,  # DSA's indexer k_norm
    "Less": _FI,
    "LessOrEqual": _FI,
    "Log": _F,
    "MatMul": _F,
    "Max": _FI,
    "Min": _FI,
    "Mul": _FI,
    "Neg": _FI,
    "NonZero": frozenset({TensorProto.FLOAT, TensorProto.FLOAT16}),
    "Not": frozenset({TensorProto.BOOL}),
    "Or": frozenset({TensorProto.BOOL}),
    "Pow": _FI,
    "QuantizeLinear": _F,  # y_zero_point must be zero
    "Range": _FI,
    "Reciprocal": _F,
    "Relu": _F,  # DSA's indexer scores
    "ReduceMax": _FI,  # axes must be an initializer
    "ReduceMean": _FI,
    "ReduceSum": _FI,
    "Reshape": _FIB,
    "ScatterElements": _FI,
    "ScatterND": _FI,  # reduction other than none is not supported
    "Shape": _FIB,
    "Sigmoid": _F,
    "Sin": _F,
    "Slice": _FIB,
    "Softmax": _F,
    "Split": _FIB,
    "Sqrt": _F,
    "Squeeze": _FIB,  # axes must be resolvable to a constant
    "Sub": _FI,
    "Tile": _FIB,
    "TopK": _FI,  # sorted must be 1; K < 3840
    "Transpose": _FIB,
    "Trilu": _FIB,
    "Unsqueeze": _FIB,  # axes must be resolvable to a constant
    "Where": _FIB,
}
# Which tensor carries the type the table lists: the data input (0) unless named here; -1 = output 0.
_TYPED_INPUT = {"Where": 1, "ConstantOfShape": -1}
# Inputs that must be build-time constants, by op: (input index, what the source calls it).
_CONSTANT_INPUTS = {
    "ReduceMax": (1, "axes"),
    "ReduceMean": (1, "axes"),
    "ReduceSum": (1, "axes"),
    "Slice": (3, "axes"),
    "Squeeze": (1, "axes"),
    "Unsqueeze": (1, "axes"),
    "TopK": (1, "K"),
}
_TYPE_NAMES = {v: k for k, v in TensorProto.DataType.items()}


def _typed(model: onnx.ModelProto, declared: Iterable[tuple[str, int, Sequence[int]]]) -> dict[str, int]:
    """Element type of every value: graph I/O, initializers, the ``declared`` ones (weights kept outside the
    model), and whatever onnx shape inference derives from them."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {i.name for i in probe.graph.initializer} | {i.name for i in probe.graph.input}
    for name, dtype, shape in declared:
        if name not in have:
            probe.graph.input.append(onnx.helper.make_tensor_value_info(name, dtype, list(shape)))
    try:
        probe = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # noqa: BLE001 (partial types are still useful; the checker reports the model itself)
        pass
    types = {}
    for vi in (*probe.graph.input, *probe.graph.output, *probe.graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    types.update({t.name: t.data_type for t in probe.graph.initializer})
    return types


def _constant_values(model: onnx.ModelProto, constants: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """Values of the build-time constants: initializers (None when their data lives outside the file) and
    Constant node outputs, plus ``constants`` given by the caller."""
    out: dict[str, np.ndarray | None] = dict(constants)
    for t in model.graph.initializer:
        out[t.name] = None if t.data_location == TensorProto.EXTERNAL else numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def check_model_supported(
    model: onnx.ModelProto,
    *,
    declared: Iterable[tuple[str, int, Sequence[int]]] = (),
    constants: dict[str, np.ndarray] | None = None,
) -> list[str]:
    """What in ``model`` TensorRT's ONNX parser would refuse, one line per problem ([] when nothing).

    Checks: the opset is in ``OPSET_RANGE``; every op is in ``OP_TYPES`` (default domain only) with its data
    input of a listed type; every tensor's dtype is in ``TENSOR_DTYPES`` (quantized ones only into
    DequantizeLinear / out of QuantizeLinear, UINT8 only at the network's edge); axes and TopK's K are
    constants, K < 3840 and ``sorted`` is 1; ScatterND/ScatterElements have no reduction; Q/DQ have no
    non-zero zero point and block along one axis. A model written without its weights (``lower_to_onnx``)
    names them in ``declared`` as (name, onnx dtype, shape) and its small constants in ``constants``.
    """
    problems: list[str] = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= opset.version <= OPSET_RANGE[1]:
            problems.append(f"opset {opset.version} is outside TensorRT {TENSORRT_VERSION}'s range {OPSET_RANGE}")
    declared = list(declared)
    types = _typed(model, declared)
    values = _constant_values(model, constants or {})
    values.update({name: None for name, _, _ in declared if name not in values})
    shapes = {name: tuple(shape) for name, _, shape in declared}
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    unsupported: dict[str, list[str]] = {}
    quantized_ok: set[str] = set()
    for n in model.graph.node:
        op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        if op not in OP_TYPES:
            unsupported.setdefault(op, []).append(n.name)
            continue
        where = f"node '{n.name}' ({op})"
        typed = n.output[0] if _TYPED_INPUT.get(op, 0) == -1 else n.input[_TYPED_INPUT.get(op, 0)]
        if typed in types and types[typed] not in OP_TYPES[op]:
            problems.append(f"{where}: {_TYPE_NAMES[types[typed]]} is not a type TensorRT supports for {op}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if op in _CONSTANT_INPUTS:
            index, what = _CONSTANT_INPUTS[op]
            if len(n.input) > index and n.input[index] and n.input[index] not in values:
                problems.append(f"{where}: {what} must be a build-time constant")
        if op == "TopK":
            k = values.get(n.input[1])
            if k is not None and int(np.asarray(k).reshape(-1)[0]) > TOPK_MAX_K:
                problems.append(f"{where}: K={int(np.asarray(k).reshape(-1)[0])} must be less than {TOPK_MAX_K + 1}")
            if attrs.get("sorted", 1) != 1:
                problems.append(f"{where}: sorted must be 1")
        if op in ("ScatterND", "ScatterElements") and attrs.get("reduction", b"none") not in (b"none", "none"):
            problems.append(f"{where}: reduction must be none (TensorRT needs a plugin otherwise)")
        if op in ("QuantizeLinear", "DequantizeLinear"):
            problems += _check_qdq(n, where, values, shapes)
            quantized_ok.add(n.input[0] if op == "DequantizeLinear" else n.output[0])
            if len(n.input) > 2 and n.input[2]:
                quantized_ok.add(n.input[2])
    for op, names in sorted(unsupported.items()):
        problems.append(
            f"op {op} ({len(names)} node(s), first '{names[0]}') is not in TensorRT {TENSORRT_VERSION}'s ONNX "
            "support list"
        )
    edge = {v.name for v in (*model.graph.input, *model.graph.output)}
    for name, dtype in sorted(types.items()):
        if dtype not in TENSOR_DTYPES:
            problems.append(f"tensor '{name}': dtype {_TYPE_NAMES.get(dtype, dtype)} is not supported by TensorRT")
        elif dtype in _QUANTIZED and name not in quantized_ok:
            problems.append(f"tensor '{name}': {_TYPE_NAMES[dtype]} is only supported into DequantizeLinear")
        elif dtype == TensorProto.UINT8 and name not in edge:
            problems.append(f"tensor '{name}': UINT8 is only supported as a network input or output")
    return problems


def _check_qdq(n: onnx.NodeProto, where: str, values: dict, shapes: dict[str, tuple]) -> list[str]:
    problems = []
    if len(n.input) > 2 and n.input[2]:
        zero = values.get(n.input[2])
        if zero is None or np.any(np.asarray(zero, dtype=np.float32) != 0):
            problems.append(f"{where}: the zero point must be a constant zero (TensorRT quantizes symmetrically)")
    if any(a.name == "block_size" for a in n.attribute) and n.input[1] not in values:
        problems.append(f"{where}: a blocked scale must be a constant (TensorRT 10.13+)")
    x, scale = shapes.get(n.input[0]), shapes.get(n.input[1])
    if x is not None and scale is not None and len(scale) == len(x) and len(x) > 1:
        blocked = [i for i, (a, b) in enumerate(zip(x, scale, strict=True)) if a != b]
        if len(blocked) > 1:  # the parser infers the block from the shapes and allows one blocked axis
            problems.append(f"{where}: scale {list(scale)} blocks input {list(x)} along {len(blocked)} axes, not one")
        elif blocked:
            block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
            dim, blocks = x[blocked[0]], scale[blocked[0]]
            if len(scale) > 2:
                problems.append(f"{where}: a blocked scale must have rank <= 2 (TensorRT 10.13+), not {len(scale)}")
            if dim % blocks or (block and dim != block * blocks):
                problems.append(
                    f"{where}: axis {blocked[0]} of {dim} is not {blocks} whole blocks of {block or '?'} (the parser "
                    "infers the block as dim / scale dim)"
                )
    return problems


def support_summary() -> dict[str, object]:
    """The list's provenance, for manifests and reports."""
    return {
        "tensorrt": TENSORRT_VERSION,
        "source": SOURCE,
        "url": SOURCE_URL,
        "opsets": list(OPSET_RANGE),
        "fp8_blocks_since": ".".join(map(str, FP8_BLOCKS_SINCE)),
    }
