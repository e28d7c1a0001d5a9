"""The IR verifier: every pass's output goes through it, in tests and in the CLI."""

from __future__ import annotations

from dsc.ir.graph import Graph
from dsc.ir.ops import SCHEMAS, TypeError_, infer_types


class VerifyError(Exception):
    """The graph is malformed. Always a compiler bug: the message names the node and the rule."""


def verify(graph: Graph) -> None:
    defined: dict[str, object] = {}

    def define(value, where: str) -> None:
        if value.name in defined:
            raise VerifyError(f"{where}: value %{value.name} is defined twice")
        defined[value.name] = value

    for v in graph.inputs:
        define(v, "graph input")
    for name, w in graph.weights.items():
        if name != w.value.name:
            raise VerifyError(f"weight table key {name} names value %{w.value.name}")
        define(w.value, "weight")
    node_names: set[str] = set()
    for node in graph.nodes:
        if node.name in node_names:
            raise VerifyError(f"node name {node.name} is used twice")
        node_names.add(node.name)
        if node.op not in SCHEMAS:
            raise VerifyError(f"{node.name}: op {node.op} has no schema")
        for v in node.inputs:
            if v.name not in defined:
                raise VerifyError(f"{node.name}: input %{v.name} is not defined before use")
            if defined[v.name] != v:
                raise VerifyError(f"{node.name}: input %{v.name} has type {v.type}, defined as {defined[v.name].type}")
        try:
            expected = infer_types(node.op, [v.type for v in node.inputs], node.attrs)
        except (TypeError_, KeyError) as exc:
            raise VerifyError(f"{node.name} ({node.op.value}): {exc}") from exc
        got = [v.type for v in node.outputs]
        if got != expected:
            raise VerifyError(
                f"{node.name} ({node.op.value}): outputs typed {[str(t) for t in got]}, "
                f"inference says {[str(t) for t in expected]}"
            )
        for v in node.outputs:
            define(v, node.name)
    for v in graph.outputs:
        if v.name not in defined or defined[v.name] != v:
            raise VerifyError(f"graph output %{v.name} is not defined")
    if len({v.name for v in graph.outputs}) != len(graph.outputs):
        raise VerifyError("graph outputs repeat a value")
