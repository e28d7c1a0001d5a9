"""Expert fusion: one grouped ``moe_experts`` op over stacked weights replaces the per-expert FFN branches.

The frontend traces each MoE layer as ``moe_combine(weights, experts, ffn_0(x), ..., ffn_{E-1}(x))`` with
``ffn_e(x) = linear(silu(linear(x, gate_e)) * linear(x, up_e), down_e)`` (DESIGN.md §3). That form is
exact but names E separate FFNs, and lowered as is it would run every expert on every token. The fused
op takes gate, up and down stacked to [E, I, H] / [E, H, I] and computes only the chosen experts; backends
choose the layout they need (onnxruntime's MoE kernel wants gate and up interleaved row by row).
Refused, with the reason in the stats, when the branches differ in shape or structure or are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsc.ir.graph import Graph, Node, Op, Stacked, Value
from dsc.passes.base import PassResult


class _Refuse(Exception):
    pass


def _producer(producers: dict[str, Node], v: Value, op: Op) -> Node:
    node = producers.get(v.name)
    if node is None or node.op != op:
        raise _Refuse(f"%{v.name} is not produced by {op.value}")
    return node


def _match_ffn(g: Graph, y: Value, producers: dict[str, Node], users: dict[str, list[Node]]) -> tuple[Value, ...]:
    """(x, gate, up, down) of one expert branch ``down(silu(gate x) * up x)``."""
    down = _producer(producers, y, Op.LINEAR)
    mul = _producer(producers, down.inputs[0], Op.MUL)
    a, b = (producers.get(v.name) for v in mul.inputs)
    act, up = (a, b) if a is not None and a.op == Op.SILU else (b, a)
    if act is None or act.op != Op.SILU:
        raise _Refuse(f"expert {y.name}: activation is not silu")
    gate = _producer(producers, act.inputs[0], Op.LINEAR)
    if up is None or up.op != Op.LINEAR or up.inputs[0] != gate.inputs[0]:
        raise _Refuse(f"expert {y.name}: gate and up projections do not read the same input")
    for node in (down, mul, act, gate, up):
        if any(len(users.get(v.name, [])) != 1 for v in node.outputs):
            raise _Refuse(f"expert {y.name}: an intermediate value is used outside the branch")
    weights = (gate.inputs[1], up.inputs[1], down.inputs[1])
    scales = tuple(lin.inputs[2] for lin in (gate, up, down) if len(lin.inputs) > 2)
    if any(w.name not in g.weights for w in weights + scales):
        raise _Refuse(f"expert {y.name}: weights are not graph weights")
    if len({w.type.dtype for w in weights}) != 1 or len(scales) not in (0, 3):
        raise _Refuse(f"expert {y.name}: gate, up and down mix FP8 and float weights")
    return (gate.inputs[0], *weights, *scales)


@dataclass(frozen=True)
class ExpertFusionPass:
    name: ClassVar[str] = "expert-fusion"
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, graph: Graph) -> PassResult:
        g = graph.clone()
        producers, users = g.producers(), g.consumers()
        fused, refused = 0, {}
        for node in list(g.nodes):
            if node.op != Op.MOE_COMBINE:
                continue
            try:
                branches = [_match_ffn(g, y, producers, users) for y in node.inputs[2:]]
            except _Refuse as why:
                refused[node.name] = str(why)
                continue
            xs = {b[0] for b in branches}
            shapes = {tuple((w.type.dtype, w.type.shape) for w in b[1:]) for b in branches}
            if len(xs) != 1:
                refused[node.name] = "experts read different inputs"
                continue
            if len(shapes) != 1:
                refused[node.name] = f"experts differ in shape: {sorted(shapes)}"
                continue
            stacked = []
            roles = ("gate", "up", "down", "gate_scale", "up_scale", "down_scale")
            for part, role in zip(zip(*(b[1:] for b in branches), strict=True), roles, strict=False):
                src = Stacked(f"stack_{role}", tuple(g.weights[w.name].source for w in part))
                name = part[0].name.replace(".experts.0.", ".experts.").replace(".weight", "") + ".stacked"
                value = Value(name, part[0].type.with_shape((len(part), *part[0].type.shape)))
                g.weights[name] = type(g.weights[part[0].name])(value, src)
                stacked.append(value)
            meta = {**node.meta, "from_pass": self.name, "from": node.name, "experts": len(branches)}
            at = g.nodes.index(node)
            g.nodes[at] = Node(
                Op.MOE_EXPERTS,
                node.name,
                (xs.pop(), *node.inputs[:2], *stacked),
                node.outputs,
                {"num_experts": len(branches)},
                meta,
            )
            fused += 1
        removed = g.remove_dead()
        stats = {"fused_layers": fused, "refused": refused, "nodes_removed": removed}
        return PassResult(g, fused > 0, stats)
