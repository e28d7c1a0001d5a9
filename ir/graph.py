"""The graph IR: typed values, frozen nodes with an op enum, lazy weights, and the graph that owns order.

A ``Value`` is a name plus a ``TensorType``. A ``Node`` applies an ``Op`` to input values and defines
output values. Weights are values too; the graph maps their names to ``Weight`` records whose
``source`` produces the tensor only when asked (a checkpoint read, or a transform recorded by a pass),
so a graph of a 600 GB model costs kilobytes until a backend streams its weights out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from dsc.ir.ops import infer_types
from dsc.ir.types import DType, Op, TensorType  # Op re-exported: dsc.ir.graph.Op


class WeightSource(Protocol):
    """Produces a weight tensor on demand. ``describe`` says where it comes from, for the printer."""

    def load(self) -> torch.Tensor: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Transformed:
    """A weight computed from other weights at write time (transpose, stack, absorb, quantize...)."""

    name: str
    inputs: tuple[WeightSource, ...]
    fn: Callable[..., torch.Tensor]

    def load(self) -> torch.Tensor:
        return self.fn(*(s.load() for s in self.inputs))

    def describe(self) -> str:
        return f"{self.name}({', '.join(s.describe() for s in self.inputs)})"


@dataclass(frozen=True, slots=True)
class Stacked:
    """Weights of equal shape stacked on a new leading axis, filled part by part (peak = the result)."""

    name: str
    parts: tuple[WeightSource, ...]

    def load(self) -> torch.Tensor:
        first = self.parts[0].load()
        out = torch.empty((len(self.parts), *first.shape), dtype=first.dtype)
        out[0] = first
        del first
        for i, part in enumerate(self.parts[1:], start=1):
            out[i] = part.load()
        return out

    def describe(self) -> str:
        return f"{self.name}({self.parts[0].describe()}, ... {len(self.parts)} parts)"


@dataclass(frozen=True, slots=True)
class Constant:
    """A small tensor built by the compiler itself."""

    tensor: torch.Tensor
    label: str = "const"

    def load(self) -> torch.Tensor:
        return self.tensor

    def describe(self) -> str:
        return self.label


@dataclass(frozen=True, slots=True)
class Value:
    name: str
    type: TensorType

    def __str__(self) -> str:
        return f"%{self.name}"

    def describe(self) -> dict[str, Any]:
        """JSON form for manifests: name, dtype and shape (symbolic dims as strings)."""
        return {"name": self.name, "dtype": self.type.dtype.value, "shape": list(self.type.shape)}


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cache tensor of the step graph: the graph input it reads (``past``) and the output that returns it
    grown by the new tokens (``present``). Recorded by the frontend in ``graph.meta["kv_cache"]`` and kept
    current by passes that change the cache (mla-absorb), so nothing finds cache pairs by their names."""

    layer: int
    role: str  # "key" / "value" (both cache forms: see cache_layout)
    past: str
    present: str

    @classmethod
    def named(cls, layer: int, role: str) -> CacheEntry:
        """The one naming convention for cache tensors: onnxruntime-genai's ``past_key_values.N.role`` in,
        ``present.N.role`` out."""
        return cls(layer, role, f"past_key_values.{layer}.{role}", f"present.{layer}.{role}")


# -- the attention and cache I/O convention (onnxruntime-genai's decoder, DESIGN.md §8), in one place ----------
# Inputs input_ids / position_ids [batch, seq] and attention_mask [batch, past+seq] (1 = a real token, 0 =
# padding, hidden from every query); per layer a key and a value cache of the same shape, head-major
# [batch, heads, past, dim] with static heads and dim, concatenated with the new tokens along the sequence axis.
ATTENTION_MASK = "attention_mask"
CACHE_SEQ_AXIS = 2


def cache_shape(heads: int, dim: int) -> tuple:
    """The symbolic shape of one cache input: [batch, heads, past, dim]."""
    return ("batch", heads, "past", dim)


def cache_layout(form: str, *, heads: int, qk_dim: int = 0, v_dim: int = 0, latent: int = 0) -> tuple[int, int]:
    """(heads, dim) of each of a layer's two cache tensors.

    naive: per-head keys (qk_dim) and values (v_dim), the narrower zero-padded to the wider so key and value
    have one shape (queries are padded with it; the padded output columns are dropped).
    latent: MLA's [c_kv | k_pe] row (``latent`` values) as one head, key = its first half and value = its second
    half, attended as one joint row (attention ``joint_kv``); an odd width gets one zero column at the end."""
    if form == "naive":
        return heads, max(qk_dim, v_dim)
    if form == "latent":
        return 1, (latent + 1) // 2
    raise ValueError(f"unknown cache form {form!r}")


@dataclass(frozen=True, slots=True)
class Weight:
    value: Value
    source: WeightSource

    @property
    def name(self) -> str:
        return self.value.name

    @property
    def nbytes(self) -> int:
        return (self.value.type.numel() or 0) * self.value.type.dtype.itemsize

    def load(self) -> torch.Tensor:
        t = self.source.load()
        want = self.value.type
        if tuple(t.shape) != want.shape or t.dtype != want.dtype.torch:
            raise AssertionError(f"weight {self.name}: source gave {t.dtype}{list(t.shape)}, IR says {want}")
        return t


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    op: Op
    name: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Value:
        assert len(self.outputs) == 1, f"{self.name} has {len(self.outputs)} outputs"
        return self.outputs[0]


class Graph:
    """Inputs, outputs, weights and an ordered list of nodes (always kept in topological order)."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.weights: dict[str, Weight] = {}
        self.meta: dict[str, Any] = {}

    # -- queries -------------------------------------------------------------------------------
    def producers(self) -> dict[str, Node]:
        return {v.name: n for n in self.nodes for v in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                users.setdefault(v.name, []).append(n)
        return users

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from (w.value for w in self.weights.values())
        for n in self.nodes:
            yield from n.outputs

    def cache_entries(self) -> tuple[CacheEntry, ...]:
        """The step graph's cache tensors (empty for graphs without a cache)."""
        return tuple(self.meta.get("kv_cache", ()))

    def layer_of(self, node: Node) -> int | None:
        """The decoder layer a node belongs to, as the frontend recorded it (None: embedding, head, helpers)."""
        return node.meta.get("layer")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op.value] = counts.get(n.op.value, 0) + 1
        return dict(sorted(counts.items()))

    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def param_count(self) -> int:
        return sum(w.value.type.numel() or 0 for w in self.weights.values())

    # -- edits ---------------------------------------------------------------------------------
    def replace_uses(self, old: Value, new: Value) -> None:
        """Point every use of ``old`` (node inputs and graph outputs) at ``new``."""
        for i, n in enumerate(self.nodes):
            if old in n.inputs:
                ins = tuple(new if v == old else v for v in n.inputs)
                self.nodes[i] = Node(n.op, n.name, ins, n.outputs, n.attrs, n.meta)
        self.outputs = [new if v == old else v for v in self.outputs]

    def rename(self, value: Value, name: str) -> Value:
        """``value`` renamed everywhere (graph inputs, outputs, node inputs and outputs); the name must be free."""
        new = Value(name, value.type)
        self.inputs = [new if v == value else v for v in self.inputs]
        for i, n in enumerate(self.nodes):
            if value in n.outputs:
                outs = tuple(new if o == value else o for o in n.outputs)
                self.nodes[i] = Node(n.op, n.name, n.inputs, outs, n.attrs, n.meta)
        self.replace_uses(value, new)
        return new

    def remove_dead(self) -> int:
        """Drop nodes and weights nothing reaches from the outputs. Returns how many nodes went."""
        live = {v.name for v in self.outputs}
        kept: list[Node] = []
        for n in reversed(self.nodes):
            if any(v.name in live for v in n.outputs):
                kept.append(n)
                live.update(v.name for v in n.inputs)
        removed = len(self.nodes) - len(kept)
        self.nodes = kept[::-1]
        self.weights = {k: w for k, w in self.weights.items() if k in live}
        return removed

    def clone(self) -> Graph:
        """A shallow copy: nodes and weights are immutable, so sharing them is safe."""
        g = Graph(self.name)
        g.inputs, g.outputs, g.nodes = list(self.inputs), list(self.outputs), list(self.nodes)
        g.weights, g.meta = dict(self.weights), dict(self.meta)
        return g


class GraphBuilder:
    """Appends nodes with shape inference and unique names. Used by the frontend and by passes."""

    def __init__(self, graph: Graph | None = None) -> None:
        self.graph = graph if graph is not None else Graph()
        self._values = {v.name for v in self.graph.values()}
        self._nodes = {n.name for n in self.graph.nodes}
        self._counter = itertools.count()
        self.insert_at: int | None = None  # None appends; an index inserts there (and advances)

    def fresh(self, hint: str, *, node: bool = False) -> str:
        """A unique value name (or node name: nodes and values have separate namespaces)."""
        taken = self._nodes if node else self._values
        name = hint
        while name in taken:
            name = f"{hint}_{next(self._counter)}"
        taken.add(name)
        return name

    def input(self, name: str, dtype: DType, shape: Sequence) -> Value:
        v = Value(self.fresh(name), TensorType(dtype, tuple(shape)))
        self.graph.inputs.append(v)
        return v

    def weight(self, name: str, dtype: DType, shape: Sequence[int], source: WeightSource) -> Value:
        if name in self.graph.weights:
            return self.graph.weights[name].value
        v = Value(self.fresh(name), TensorType(dtype, tuple(shape)))
        self.graph.weights[v.name] = Weight(v, source)
        return v

    def op(
        self,
        op: Op,
        inputs: Iterable[Value],
        attrs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        out_names: Sequence[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Node:
        inputs = tuple(inputs)
        attrs = dict(attrs or {})
        out_types = infer_types(op, [v.type for v in inputs], attrs)
        node_name = self.fresh(name or op.value, node=True)
        if out_names is None:
            out_names = [node_name] if len(out_types) == 1 else [f"{node_name}.{i}" for i in range(len(out_types))]
        outputs = tuple(Value(self.fresh(n), t) for n, t in zip(out_names, out_types, strict=True))
        node = Node(op, node_name, inputs, outputs, attrs, dict(meta or {}))
        if self.insert_at is None:
            self.graph.nodes.append(node)
        else:
            self.graph.nodes.insert(self.insert_at, node)
            self.insert_at += 1
        return node

    def output(self, value: Value) -> None:
        self.graph.outputs.append(value)
