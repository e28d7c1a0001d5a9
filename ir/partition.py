"""Cut a graph into segments at chosen nodes, so a runtime can run the pieces between them separately
(expert parallelism runs the MoE nodes itself, across processes, between dense segments)."""

from __future__ import annotations

from dataclasses import dataclass

from dsc.ir.graph import Graph, Node, Op


@dataclass
class Partition:
    segments: list[Graph]  # segment k runs before cut k (the last one after the last cut)
    cuts: list[Node]  # the nodes between segments, run by the caller


def split_at(graph: Graph, op: Op = Op.MOE_EXPERTS) -> Partition:
    """Segments of ``graph`` between its ``op`` nodes. Each segment's inputs are the values it uses but does not
    define (graph inputs or values of earlier segments and cuts); its outputs are the values it defines that
    later segments, cuts or the graph's outputs use. Weights go with the segments that use them."""
    cut_at = [i for i, n in enumerate(graph.nodes) if n.op == op]
    bounds = [-1, *cut_at, len(graph.nodes)]
    pieces = [graph.nodes[bounds[k] + 1 : bounds[k + 1]] for k in range(len(bounds) - 1)]
    cuts = [graph.nodes[i] for i in cut_at]
    used_after: list[set[str]] = []
    later = {v.name for v in graph.outputs}
    for k in range(len(pieces) - 1, -1, -1):  # values used by anything after segment k
        used_after.insert(0, set(later))
        later |= {v.name for n in pieces[k] for v in n.inputs}
        if k > 0:
            later |= {v.name for v in cuts[k - 1].inputs}
    values = {v.name: v for v in graph.values()}
    segments = []
    for k, nodes in enumerate(pieces):
        defined = {v.name for n in nodes for v in n.outputs}
        seg = Graph(f"{graph.name}.segment{k}")
        seg.nodes = list(nodes)
        needed: list[str] = []
        for n in nodes:
            for v in n.inputs:
                if v.name not in defined and v.name not in graph.weights and v.name not in needed:
                    needed.append(v.name)
        seg.inputs = [values[name] for name in needed]
        seg.outputs = [v for n in nodes for v in n.outputs if v.name in used_after[k]]
        seg.weights = {
            name: w for name, w in graph.weights.items() if any(v.name == name for n in nodes for v in n.inputs)
        }
        seg.meta = dict(graph.meta)
        segments.append(seg)
    return Partition(segments, cuts)
