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

from collections.abc import Sequence

import onnx
import torch
from dsc.backends.onnx_io import ONNX_DTYPES, Initializer
from onnx import TensorProto, helper, numpy_helper

LOW_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}
_F32 = TensorProto.FLOAT


def value_types(model: onnx.ModelProto, initializers: Sequence[Initializer]) -> dict[str, int]:
    """Element type of every value of ``model`` whose weights are the ``initializers`` (onnx shape inference)."""
    from dsc.backends.tensorrt_ops import _typed

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
