"""Trace dsc's torch definition (frontends/model.py) into the IR with torch.fx.

Each piece (embedding, every decoder layer, the head) is traced separately by a Tracer that keeps
``Leaf`` modules whole; the fx graphs are then translated node by node into one IR graph. fx nodes
that are ordinary torch code (add, mul, silu, split, cat, unflatten, flatten, unsqueeze, expand) map to
the IR's elementwise and shape ops; anything else is a bug in the model definition and fails loudly.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from dsc.frontends.model import DeepseekModel, Leaf
from dsc.ir.graph import (
    ATTENTION_MASK,
    CACHE_SEQ_AXIS,
    CacheEntry,
    Graph,
    GraphBuilder,
    Op,
    Value,
    cache_layout,
    cache_shape,
)
from dsc.ir.ops import block_scale_shape
from dsc.ir.types import DType, dim_add
from torch import nn

if TYPE_CHECKING:
    from dsc.frontends.config import ModelConfig

# (checkpoint key, expected shape) -> (IR dtype, lazy source[, block-scale source for FP8 weights]).
# Raises a DscError for a bad checkpoint.
WeightProvider = Callable[[str, tuple[int, ...]], tuple]


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Leaf) or super().is_leaf_module(m, qualname)


def _reshape_attrs(x: Value, new_shape: Sequence[int]) -> dict[str, Any]:
    """Express a reshape whose leading dims are unchanged with ONNX-style 0 = copy."""
    lead = 0
    while lead < min(len(new_shape), x.type.rank) and not isinstance(x.type.shape[lead], int):
        lead += 1
    return {"shape": tuple([0] * lead + list(new_shape[lead:]))}


class _Translator:
    def __init__(self, builder: GraphBuilder, weights: WeightProvider, prefix: str, layer: int | None = None) -> None:
        self.b = builder
        self.weights = weights
        self.prefix = prefix
        self.meta = {} if layer is None else {"layer": layer}

    def op(self, op: Op, inputs, attrs=None, hint: str = "") -> Any:
        node = self.b.op(op, inputs, attrs, name=f"{self.prefix}{hint or op.value}", meta=self.meta)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def leaf(self, gm: fx.GraphModule, target: str, args: list[Value]) -> Any:
        mod = gm.get_submodule(target)
        assert isinstance(mod, Leaf)
        ws, scales = [], []
        for key, shape in mod.weight_specs:
            dtype, source, *scale = self.weights(key, shape)
            ws.append(self.b.weight(key, dtype, shape, source))
            if scale:  # native FP8: the weight keeps its checkpoint bytes, with DeepSeek's block scales beside it
                assert mod.op == Op.LINEAR, f"{key}: FP8 weights are only expected on linear layers"
                scales.append(self.b.weight(f"{key}_scale_inv", DType.F32, block_scale_shape(shape), scale[0]))
        return self.op(mod.op, list(args) + ws + scales, mod.attrs, hint=target.replace(".", "_"))

    def method(self, name: str, args: list, kwargs: dict) -> Any:
        x = args[0]
        shape = list(x.type.shape)
        if name == "unflatten":
            dim, sizes = args[1], args[2]
            dim %= len(shape)
            return self.op(Op.RESHAPE, [x], _reshape_attrs(x, shape[:dim] + list(sizes) + shape[dim + 1 :]))
        if name == "flatten":
            start = args[1] % len(shape)
            merged = 1
            for d in shape[start:]:
                merged *= d
            return self.op(Op.RESHAPE, [x], _reshape_attrs(x, shape[:start] + [merged]))
        if name == "unsqueeze":
            dim = args[1] % (len(shape) + 1)
            return self.op(Op.RESHAPE, [x], _reshape_attrs(x, shape[:dim] + [1] + shape[dim:]))
        if name == "expand":
            sizes = args[1:]
            axes = [i for i, s in enumerate(sizes) if s != -1]
            assert len(axes) == 1, f"expand over {axes}: only one axis supported"
            return self.op(Op.EXPAND, [x], {"axis": axes[0], "size": sizes[axes[0]]})
        if name in ("transpose", "permute"):
            if name == "transpose":
                perm = list(range(len(shape)))
                a, b = args[1] % len(shape), args[2] % len(shape)
                perm[a], perm[b] = perm[b], perm[a]
            else:
                perm = [p % len(shape) for p in args[1:]]
            return self.op(Op.TRANSPOSE, [x], {"perm": tuple(perm)})
        if name == "split":
            return self.op(
                Op.SPLIT,
                [x],
                {"axis": kwargs.get("dim", args[2] if len(args) > 2 else 0), "sizes": tuple(args[1])},
            )
        raise NotImplementedError(f"tracer: method {name} has no IR mapping")

    def function(self, fn: Any, args: list, kwargs: dict) -> Any:
        if fn is operator.add:
            return self.op(Op.ADD, args)
        if fn is operator.mul:
            return self.op(Op.MUL, args)
        if fn is torch.nn.functional.silu:
            return self.op(Op.SILU, args)
        if fn is torch.cat:
            return self.op(Op.CONCAT, list(args[0]), {"axis": kwargs.get("dim", args[1] if len(args) > 1 else 0)})
        if fn is torch.nn.functional.pad:
            pad = tuple(args[1])
            assert len(pad) == 2 and pad[0] == 0 and kwargs.get("value") in (None, 0), f"pad {pad}: zeros after the end"
            return self.op(Op.PAD, [args[0]], {"after": pad[1]})
        if fn is operator.getitem:
            return args[0][args[1]]
        raise NotImplementedError(f"tracer: function {fn} has no IR mapping")

    def run(self, module: nn.Module, inputs: Sequence[Value]) -> Any:
        gm = fx.GraphModule(module, _LeafTracer().trace(module))
        env: dict[str, Any] = {}
        placeholders = iter(inputs)

        def load(a):
            return fx.node.map_arg(a, lambda n: env[n.name])

        for node in gm.graph.nodes:
            args, kwargs = load(node.args), load(node.kwargs)
            if node.op == "placeholder":
                env[node.name] = next(placeholders)
            elif node.op == "call_module":
                env[node.name] = self.leaf(gm, node.target, list(args))
            elif node.op == "call_method":
                env[node.name] = self.method(node.target, list(args), dict(kwargs))
            elif node.op == "call_function":
                env[node.name] = self.function(node.target, list(args), dict(kwargs))
            elif node.op == "output":
                return args[0]
            else:
                raise NotImplementedError(f"tracer: fx op {node.op}")
        raise AssertionError("fx graph has no output")


def empty_cache(graph: Graph, batch: int) -> dict[str, torch.Tensor]:
    """Zero-length past caches for every cache input of a traced graph (the feeds of a first step)."""
    past = {c.past for c in graph.cache_entries()}
    return {
        v.name: torch.zeros([batch if d == "batch" else 0 if d == "past" else d for d in v.type.shape])
        for v in graph.inputs
        if v.name in past
    }


# the cache role of DSA's indexer keys: [batch, 1, past, index_head_dim] per layer (head-major, one head)
INDEXER_ROLE = "indexer_key"


def step_feeds(graph: Graph, input_ids, position_ids, past: dict | None = None, attention_mask=None) -> dict:
    """The interpreter's feeds for one step: ids, positions, the mask (all ones by default) and the past cache
    (``past``: {input name: tensor}; the empty cache by default)."""
    ids = torch.as_tensor(input_ids)
    past = dict(past) if past is not None else empty_cache(graph, ids.shape[0])
    if attention_mask is None:
        seen = next((t.shape[CACHE_SEQ_AXIS] for t in past.values()), 0)
        attention_mask = torch.ones(ids.shape[0], seen + ids.shape[1], dtype=torch.int64)
    return {
        "input_ids": ids,
        "position_ids": torch.as_tensor(position_ids),
        ATTENTION_MASK: torch.as_tensor(attention_mask),
        **past,
    }


def trace_model(cfg: ModelConfig, weights: WeightProvider, name: str = "deepseek") -> Graph:
    """Build the IR of one forward step: (input_ids, position_ids, attention_mask, past KV) -> (logits, present
    KV), with the cache convention of ir/graph.py (cache_layout)."""
    model = DeepseekModel(cfg)
    b = GraphBuilder(Graph(name))
    ids = b.input("input_ids", DType.I64, ("batch", "seq"))
    pos = b.input("position_ids", DType.I64, ("batch", "seq"))
    mask = b.input(ATTENTION_MASK, DType.I64, ("batch", dim_add("past", "seq")))
    heads, dim = cache_layout("naive", heads=cfg.num_attention_heads, qk_dim=cfg.qk_head_dim, v_dim=cfg.v_head_dim)
    shapes = {"key": cache_shape(heads, dim), "value": cache_shape(heads, dim)}
    if cfg.sparse_attention is not None:  # DSA: the lightning indexer's keys, one head (DESIGN.md §9)
        shapes[INDEXER_ROLE] = cache_shape(1, cfg.sparse_attention.head_dim)
    cache = [tuple(CacheEntry.named(i, role) for role in shapes) for i in range(cfg.num_hidden_layers)]
    past = [[b.input(c.past, DType.F32, shapes[c.role]) for c in entries] for entries in cache]
    h = _Translator(b, weights, "embed/").run(model.embed, [ids])
    presents = []
    for i, layer in enumerate(model.layers):
        h, *present = _Translator(b, weights, f"layers.{i}/", layer=i).run(layer, [h, pos, mask, *past[i]])
        presents.append(present)
    logits = _Translator(b, weights, "head/").run(model.head, [h])
    outputs = [_renamed(b.graph, logits, "logits")]
    for present, entries in zip(presents, cache, strict=True):
        outputs += [_renamed(b.graph, v, c.present) for v, c in zip(present, entries, strict=True)]
    b.graph.outputs = outputs
    b.graph.meta["model_config"] = cfg
    b.graph.meta["kv_cache"] = tuple(e for entries in cache for e in entries)
    b.graph.meta["kv_cache_form"] = "naive"
    return b.graph


def _renamed(graph: Graph, value: Value, name: str) -> Value:
    """Rename the node output ``value`` to ``name`` (graph outputs carry their ONNX names)."""
    new = Value(name, value.type)
    for i, n in enumerate(graph.nodes):
        if value in n.outputs:
            outs = tuple(new if o == value else o for o in n.outputs)
            graph.nodes[i] = type(n)(n.op, n.name, n.inputs, outs, n.attrs, n.meta)
            break
    else:
        raise AssertionError(f"{value} is not a node output")
    graph.replace_uses(value, new)
    return new
