"""Strong typing of the TensorRT ONNX flavour: the plan's precision is the ONNX graph's own dtypes (DESIGN.md §8).

TensorRT 11 builds strongly typed networks only (BuilderFlag FP16/BF16/FP8 are gone, setPrecision/setOutputType
deprecated since 10.12), so ``--precision bf16|fp16`` is written into the ONNX model, not asked of the builder:
``retype`` stores every float weight in that dtype and runs every float op in it, except the nodes it pins to
float32 (the MoE routers' scores, group mask and TopK, where a rounded score can flip a discrete choice, and the
RMS norms), which get Casts at their edges. Graph inputs and outputs stay float32 (logits, and the cache as the
runtime holds it); Casts convert at the edges.

Small float constants needed in both dtypes are stored once per dtype (1e-20 would be 0 in fp16).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import onnx
import torch
from dsc.backends.onnx_io import ONNX_DTYPES, Initializer
from dsc.backends.tensorrt_ops import FP8_BLOCKS_SINCE
from onnx import TensorProto, helper, numpy_helper

LOW_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}
_F32 = TensorProto.FLOAT


def value_types(model: onnx.ModelProto, initializers: Sequence[Initializer]) -> dict[str, int]:
    """Element type of every value of ``model`` whose weights are the ``initializers`` (onnx shape inference)."""
    from dsc.backends.tensorrt_ops import _typed  # noqa: PLC0415

    return _typed(model, [(i.name, ONNX_DTYPES[i.dtype], i.shape) for i in initializers])


def _convert(init: Initializer, dtype: torch.dtype, name: str) -> Initializer:
    return Initializer(name, dtype, init.shape, lambda i=init: i.load().to(dtype))


def retype(
    model: onnx.ModelProto, initializers: Sequence[Initializer], precision: str, pinned: tuple[str, ...]
) -> tuple[onnx.ModelProto, list[Initializer], dict[str, int]]:
    """``model`` with its float32 computation in ``precision`` ("fp32" returns it unchanged) except the nodes
    whose names start with one of ``pinned``; returns (model, initializers, stats: casts, pinned nodes, weights
    converted)."""
    if precision == "fp32":
        return model, list(initializers), {"casts": 0, "pinned_nodes": 0, "weights_converted": 0}
    low_torch = LOW_PRECISIONS[precision]
    low = ONNX_DTYPES[low_torch]
    types = value_types(model, initializers)
    inits = {i.name: i for i in initializers}
    graph = model.graph
    outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == _F32}

    def region(node: onnx.NodeProto) -> int:
        return _F32 if node.name.startswith(pinned) else low

    # dtype each float value now has: graph inputs stay float32, node outputs take their node's region.
    now: dict[str, int] = {i.name: _F32 for i in graph.input}
    for node in graph.node:
        for o in node.output:
            if types.get(o) == _F32:
                now[o] = region(node)
    # Float initializers in the dtype(s) of their consumers: one copy per dtype.
    wanted: dict[str, set[int]] = {}
    for node in graph.node:
        for i in node.input:
            if i in inits and types.get(i) == _F32:
                wanted.setdefault(i, set()).add(region(node))
    copies: dict[tuple[str, int], str] = {}
    new_inits: list[Initializer] = []
    converted = 0
    for init in initializers:
        need = wanted.get(init.name)
        if not need:
            new_inits.append(init)
            continue
        if _F32 in need:
            new_inits.append(init)
            copies[(init.name, _F32)] = init.name
        if low in need:
            name = init.name if _F32 not in need else f"{init.name}.{precision}"
            new_inits.append(_convert(init, low_torch, name))
            copies[(init.name, low)] = name
            converted += 1

    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    renamed = {o: f"{o}.{precision}" for o in outputs if now.get(o) == low}

    def feed(value: str, dtype: int) -> str:
        if (value, dtype) in copies:
            return copies[(value, dtype)]
        value = renamed.get(value, value)
        if value not in now or now[value] == dtype:
            return value
        if (value, dtype) not in casts:
            out = f"to_{'fp32' if dtype == _F32 else precision}/{value}"  # outside every pinned prefix
            nodes.append(helper.make_node("Cast", [value], [out], name=out, to=dtype))
            casts[(value, dtype)] = out
        return casts[(value, dtype)]

    pinned_nodes = 0
    for node in graph.node:
        dtype = region(node)
        pinned_nodes += dtype == _F32
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, i in enumerate(node.input):
            if i and (types.get(i) == _F32 or (i, dtype) in copies):
                new.input[k] = feed(i, dtype)
        for k, o in enumerate(node.output):
            if o in renamed:
                new.output[k] = renamed[o]
        if dtype == low:
            _retype_attributes(new, low)
        nodes.append(new)
    for o, r in renamed.items():
        nodes.append(helper.make_node("Cast", [r], [o], name=f"to_fp32/{o}", to=_F32))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.value_info[:]
    stats = {"casts": len(casts) + len(renamed), "pinned_nodes": pinned_nodes, "weights_converted": converted}
    return out, new_inits, stats


def _retype_attributes(node: onnx.NodeProto, low: int) -> None:
    """Ops whose float output type comes from an attribute, not an input: Cast to float, ConstantOfShape's and
    Constant's float values."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == _F32:
            a.i = low
        elif node.op_type in ("ConstantOfShape", "Constant") and a.name == "value" and a.t.data_type == _F32:
            array = numpy_helper.to_array(a.t)
            t = torch.from_numpy(array.copy()).to(LOW_PRECISIONS["fp16" if low == TensorProto.FLOAT16 else "bf16"])
            a.t.CopyFrom(_tensor(t, a.t.name))


def _tensor(t: torch.Tensor, name: str) -> onnx.TensorProto:
    """A float16/bfloat16 torch tensor as an ONNX TensorProto (raw little-endian bytes)."""
    raw = t.contiguous().view(torch.int16).numpy().tobytes()
    return helper.make_tensor(name, ONNX_DTYPES[t.dtype], list(t.shape), raw, raw=True)


def initializer_dtypes(initializers: Sequence[Initializer]) -> dict[str, int]:
    """Bytes of weights per dtype name, for the build log and the manifest."""
    out: dict[str, int] = {}
    for i in initializers:
        key = str(i.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + i.nbytes
    return out


# -- FP8 weights, the way each TensorRT version takes them (DESIGN.md §8) --------------------------------------
# Blocked DequantizeLinear is INT4-only through TensorRT 10.12 (NvInfer.h); FP8/FP4 blocks arrive in 10.13, with
# scales of rank <= 2 rooted at a constant, and the importer infers the block as input dim / scale dim.


def parse_tensorrt_version(text: str) -> tuple[int, int]:
    """ "10.13.3.9" -> (10, 13): the tensorrt package's ``__version__``."""
    m = re.match(r"(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"not a TensorRT version: {text!r}")
    return int(m.group(1)), int(m.group(2))


def _dequantized(x: Initializer, scale: Initializer, axis: int, block: int) -> Initializer:
    def load() -> torch.Tensor:
        s = scale.load().float().repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
        return x.load().float() * s

    return Initializer(x.name, torch.float32, x.shape, load)


def _padded(x: Initializer, axis: int, to: int) -> Initializer:
    shape = tuple(to if i == axis else d for i, d in enumerate(x.shape))

    def load() -> torch.Tensor:
        out = torch.zeros(shape, dtype=x.dtype)
        out.narrow(axis, 0, x.shape[axis]).copy_(x.load())
        return out

    return Initializer(x.name, x.dtype, shape, load)


def fp8_for_tensorrt(
    model: onnx.ModelProto, initializers: Sequence[Initializer], version: tuple[int, int]
) -> tuple[onnx.ModelProto, list[Initializer], dict[str, int]]:
    """Each FP8 weight's blocked DequantizeLinear made into what TensorRT ``version`` builds:

    - kept FP8 (TensorRT >= 10.13) when its scale has rank <= 2 and no Gather reads the result; a partial last
      block (the importer would stretch the blocks over the whole axis) is padded with zero weights to full
      blocks and sliced back after the DequantizeLinear;
    - dequantized at compile time to float32 (``retype`` then stores it in the plan's precision) before 10.13,
      and for expert stacks (a 3-D scale; a DequantizeLinear feeding a Gather would dequantize every expert on
      every step).
    Returns (model, initializers, stats: kept, padded, dequantized, dequantized_bytes)."""
    inits = {i.name: i for i in initializers}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in out.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    replaced: dict[str, Initializer] = {}
    renames: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    stats = {"kept": 0, "padded": 0, "dequantized": 0, "dequantized_bytes": 0}
    for node in out.graph.node:
        x, scale = (inits.get(n) for n in node.input[:2]) if node.op_type == "DequantizeLinear" else (None, None)
        if x is None or scale is None or x.dtype != torch.float8_e4m3fn:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis, block = attrs.get("axis", 1) % len(x.shape), attrs.get("block_size", 0)
        gathered = any(r.op_type == "Gather" for r in readers.get(node.output[0], ()))
        if not block or version < FP8_BLOCKS_SINCE or len(scale.shape) > 2 or gathered:
            if not block:
                block = x.shape[axis]  # per-tensor or per-axis scale: one "block" spans the axis
            replaced[x.name] = _dequantized(x, scale, axis, block)
            renames[node.output[0]] = x.name
            stats["dequantized"] += 1
            stats["dequantized_bytes"] += x.nbytes * 4
            continue
        stats["kept"] += 1
        full = -(-x.shape[axis] // block) * block
        if full == x.shape[axis]:
            nodes.append(node)
            continue
        replaced[x.name] = _padded(x, axis, full)
        padded = f"{node.output[0]}/padded"
        dq = onnx.NodeProto()
        dq.CopyFrom(node)
        dq.output[0] = padded
        nodes.append(dq)
        starts, ends, axes = (f"{node.name}/pad_{k}" for k in ("starts", "ends", "axes"))
        for name, value in ((starts, 0), (ends, x.shape[axis]), (axes, axis)):
            replaced[name] = Initializer(name, torch.int64, (1,), lambda v=value: torch.tensor([v]))
        nodes.append(
            helper.make_node("Slice", [padded, starts, ends, axes], [node.output[0]], name=f"{node.name}/unpad")
        )
        stats["padded"] += 1
    kept = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for k, i in enumerate(copy.input):
            copy.input[k] = renames.get(i, i)
        kept.append(copy)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    used = {i for n in out.graph.node for i in n.input}
    out_inits = [replaced.get(i.name, i) for i in initializers]
    out_inits += [v for k, v in replaced.items() if k not in inits]
    return out, [i for i in out_inits if i.name in used], stats


# -- activation memory, estimated from the ONNX graph ------------------------------------------------------------
_BYTES = {
    TensorProto.FLOAT: 4,
    TensorProto.FLOAT16: 2,
    TensorProto.BFLOAT16: 2,
    TensorProto.INT64: 8,
    TensorProto.INT32: 4,
    TensorProto.BOOL: 1,
    TensorProto.FLOAT8E4M3FN: 1,
    TensorProto.UINT8: 1,
    TensorProto.INT8: 1,
}


def activation_bytes_estimate(
    model: onnx.ModelProto, initializers: Sequence[Initializer], input_shapes: dict[str, Sequence[int]]
) -> tuple[int, int]:
    """(peak bytes, values of unknown size) of the activations of one step whose inputs have ``input_shapes``:
    shapes inferred through the graph, each value alive from its producer to its last reader, the largest sum
    of live values over the node order. TensorRT fuses, reuses and adds its own scratch, so this is the order of
    magnitude its ``device_memory_size`` reports, for plans built where that cannot be asked."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for v in probe.graph.input:
        dims = v.type.tensor_type.shape.dim
        for d, n in zip(dims, input_shapes[v.name], strict=True):
            d.Clear()
            d.dim_value = n
    have = {v.name for v in probe.graph.input}
    for i in initializers:
        if i.name not in have:
            probe.graph.input.append(helper.make_tensor_value_info(i.name, ONNX_DTYPES[i.dtype], list(i.shape)))
    values = {i.name: i for i in initializers}
    constants = {i.name: i.load() for i in initializers if i.dtype == torch.int64 and i.nbytes <= 1024}
    for name, t in constants.items():  # shape vectors, axes: let inference see their values
        probe.graph.initializer.append(numpy_helper.from_array(t.numpy(), name))
    inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    sizes: dict[str, int | None] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        sizes[vi.name] = None if None in dims or tt.elem_type not in _BYTES else _BYTES[tt.elem_type] * _prod(dims)
    last: dict[str, int] = {}
    for k, node in enumerate(model.graph.node):
        for i in node.input:
            last[i] = k
    live: dict[str, int] = {}
    peak = unknown = 0
    outputs = {o.name for o in model.graph.output}
    for k, node in enumerate(model.graph.node):
        for o in node.output:
            size = sizes.get(o)
            if size is None:
                unknown += 1
            elif o not in values:
                live[o] = size
        peak = max(peak, sum(live.values()))
        for i in node.input:
            if last.get(i) == k and i in live and i not in outputs:
                del live[i]
    return peak, unknown


def _prod(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n
