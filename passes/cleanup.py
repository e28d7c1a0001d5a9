"""Cleanup: drop dead nodes and weights, and fold reshapes that change nothing or follow another reshape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsc.ir.graph import Graph, Node, Op
from dsc.passes.base import PassResult


@dataclass(frozen=True)
class CleanupPass:
    name: ClassVar[str] = "cleanup"
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, graph: Graph) -> PassResult:
        g = graph.clone()
        folded = identity = 0
        dead = g.remove_dead()
        while True:  # folding exposes identities and vice versa: iterate to a fixed point
            change = self._rewrite_one(g)
            if change is None:
                break
            folded += change == "folded"
            identity += change == "identity"
            dead += g.remove_dead()
        stats = {"dead_nodes": dead, "identity_reshapes": identity, "folded_reshapes": folded}
        return PassResult(g, bool(dead or identity or folded), stats)

    def _rewrite_one(self, g: Graph) -> str | None:
        producers = g.producers()
        for i, node in enumerate(g.nodes):
            if node.op != Op.RESHAPE:
                continue
            src = producers.get(node.inputs[0].name)
            if node.inputs[0].type.shape == node.output.type.shape and node.output not in g.outputs:
                g.replace_uses(node.output, node.inputs[0])
                return "identity"
            if src is not None and src.op == Op.RESHAPE and _copies_only_symbolic(node, src):
                # reshape(reshape(x)) == reshape(x) when only leading symbolic dims are copied through.
                meta = {**node.meta, "from_pass": self.name, "folded": src.name}
                g.nodes[i] = Node(Op.RESHAPE, node.name, src.inputs, node.outputs, node.attrs, meta)
                return "folded"
        return None


def _copies_only_symbolic(node: Node, src: Node) -> bool:
    x = src.inputs[0].type
    shape = node.attrs["shape"]
    return all(s != 0 or not isinstance(x.shape[i], int) for i, s in enumerate(shape)) and all(
        s == 0 for i, s in enumerate(shape) if i < x.rank and not isinstance(x.shape[i], int)
    )
