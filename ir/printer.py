"""A stable, readable text form of the IR (used by --print-ir-after-all and --dump-ir-dir)."""

from __future__ import annotations

from typing import Any

from dsc.ir.graph import Graph, Node


def _fmt_attr(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.8g}"
    if isinstance(value, (list, tuple)):
        if len(value) > 8:
            head = ", ".join(_fmt_attr(v) for v in value[:3])
            return f"[{head}, ... {len(value)} items]"
        return "[" + ", ".join(_fmt_attr(v) for v in value) + "]"
    return str(value)


def format_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    ins = ", ".join(f"%{v.name}" for v in node.inputs)
    attrs = ", ".join(f"{k}={_fmt_attr(v)}" for k, v in sorted(node.attrs.items()))
    text = f"  {outs} = {node.op.value}({ins})"
    return text + (f" {{{attrs}}}" if attrs else "")


def format_graph(graph: Graph, *, weights: bool = True) -> str:
    lines = [f"graph {graph.name}("]
    lines += [f"  %{v.name}: {v.type}," for v in graph.inputs]
    lines.append(") {")
    if weights:
        for w in graph.weights.values():
            lines.append(f"  weight %{w.name}: {w.value.type} = {w.source.describe()}")
    lines += [format_node(n) for n in graph.nodes]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
