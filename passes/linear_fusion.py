"""Linear fusion: linear nodes that read the same input become one linear over their concatenated weights,
followed by one split.

Decode runs one token at a time, so every linear is a matrix-vector product whose fixed cost (a kernel launch,
an output allocation, threads woken and joined) is comparable to its arithmetic on small layers. DeepSeek's MLA
reads the normalized hidden state twice (q_a_proj and kv_a_proj_with_mqa, DESIGN.md §4) and every SwiGLU FFN
reads its input twice (gate_proj and up_proj, §3); fused, each pair is one GEMM over the same bytes of weights.
When a fused output was only split again on its last axis (kv_a's [c_kv | k_pe]), that split's sizes join the
fusion's split, so no extra node remains.

The fused weight is a lazy ``Transformed`` concatenation of the parts' sources: nothing is read until a backend
writes it. FP8 linears (weight + ``[ceil(out/128), ceil(in/128)]`` block scales) fuse only when every part but
the last has an out dim that is a multiple of 128: then the scales concatenate exactly and no 128-row block
straddles two matrices; otherwise they are left alone (stats say why). FP8 and float parts never mix. The
result stays a plain ``linear``, so a quantization pass running afterwards sees an ordinary linear (and
fp8-quantize records the fused weight for ``--report``, with the concatenation as its original).

Routed expert branches (the per-expert FFNs under a ``moe_combine``) are left to expert-fusion, which needs
them unfused, whatever the pass order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from dsc.ir.graph import Graph, GraphBuilder, Node, Op, Transformed, Value, Weight
from dsc.ir.ops import FP8_BLOCK
from dsc.ir.types import DType
from dsc.passes.base import PassResult


def _cat_rows(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def _joined(names: list[str], sep: str) -> str:
    """``a.b.q_a_proj.weight`` + ``a.b.kv_a_proj.weight`` -> ``a.b.q_a_proj+kv_a_proj.weight``."""
    split = [n.split(sep) for n in names]
    head = 0
    while all(len(s) > head + 1 and s[head] == split[0][head] for s in split):
        head += 1
    tail = 0
    while all(len(s) > head + tail + 1 and s[-1 - tail] == split[0][-1 - tail] for s in split):
        tail += 1
    middle = "+".join(sep.join(s[head : len(s) - tail]) for s in split)
    return sep.join([*split[0][:head], middle, *split[0][len(split[0]) - tail :]])


def _expert_branch_nodes(g: Graph, producers: dict[str, Node]) -> set[str]:
    """Names of the nodes between each moe_combine's expert outputs and the experts' shared input."""
    inside: set[str] = set()
    for combine in (n for n in g.nodes if n.op == Op.MOE_COMBINE):
        route = producers.get(combine.inputs[0].name)
        stop = route.inputs[0].name if route is not None and route.op == Op.MOE_ROUTE else None
        stack = [v.name for v in combine.inputs[2:]]
        while stack:
            node = producers.get(stack.pop())
            if node is None or node.name in inside:
                continue
            inside.add(node.name)
            stack.extend(v.name for v in node.inputs if v.name != stop)
    return inside


@dataclass(frozen=True)
class LinearFusionPass:
    name: ClassVar[str] = "linear-fusion"
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, graph: Graph) -> PassResult:
        g = graph.clone()
        producers, users = g.producers(), g.consumers()
        experts = _expert_branch_nodes(g, producers)
        groups: dict[tuple[str, int, DType], list[Node]] = {}
        refused: dict[str, str] = {}
        skipped_experts = 0
        for node in g.nodes:
            if node.op != Op.LINEAR:
                continue
            if node.name in experts:
                skipped_experts += 1
                continue
            if any(v.name not in g.weights for v in node.inputs[1:]):
                continue
            groups.setdefault((node.inputs[0].name, len(node.inputs), node.inputs[1].type.dtype), []).append(node)
        fused = nodes_removed = 0
        for members in groups.values():
            if len(members) < 2:
                continue
            if len(members[0].inputs) == 3:
                members = self._fp8_fusable(members, refused)
                if len(members) < 2:
                    continue
            nodes_removed += self._fuse(g, members, users)
            fused += 1
        stats = {
            "fused": fused,
            "nodes_removed": nodes_removed,
            "refused": refused,
            "routed_expert_linears_left": skipped_experts,
        }
        return PassResult(g, fused > 0, stats)

    @staticmethod
    def _fp8_fusable(members: list[Node], refused: dict[str, str]) -> list[Node]:
        """Aligned parts first, then at most one part whose out dim is not a multiple of 128 (it goes last)."""
        aligned = [n for n in members if n.inputs[1].type.shape[0] % FP8_BLOCK == 0]
        ragged = [n for n in members if n.inputs[1].type.shape[0] % FP8_BLOCK != 0]
        for n in ragged[1:]:
            refused[n.name] = (
                f"fp8 out dim {n.inputs[1].type.shape[0]} is not a multiple of {FP8_BLOCK}: its block scales "
                "would not concatenate exactly"
            )
        return aligned + ragged[:1]

    def _fuse(self, g: Graph, members: list[Node], users: dict[str, list[Node]]) -> int:
        """Replace ``members`` by LINEAR + SPLIT at the first member's place. Returns the net node count removed."""
        x = members[0].inputs[0]
        parts = [[g.weights[n.inputs[i].name] for n in members] for i in range(1, len(members[0].inputs))]
        fused_inputs: list[Value] = [x]
        for role, ws in zip(("weight", "scale"), parts, strict=False):
            name = GraphBuilder(g).fresh(_joined([w.name for w in ws], "."))
            rows = sum(w.value.type.shape[0] for w in ws)
            value = Value(name, ws[0].value.type.with_shape((rows, *ws[0].value.type.shape[1:])))
            source = Transformed(f"concat_{role}s", tuple(w.source for w in ws), _cat_rows)
            g.weights = _insert_before(g.weights, ws[0].name, Weight(value, source))
            fused_inputs.append(value)
        fresh = GraphBuilder(g).fresh
        node_name = fresh(_joined([n.name for n in members], "/"), node=True)
        meta = {**members[0].meta, "from_pass": self.name, "from": [n.name for n in members]}
        out_type = members[0].output.type
        out = Value(fresh(node_name), out_type.with_shape((*out_type.shape[:-1], fused_inputs[1].type.shape[0])))
        sizes: list[int] = []
        outputs: list[Value] = []
        absorbed: list[Node] = []
        for n in members:
            follow = users.get(n.output.name, [])
            inner = follow[0] if len(follow) == 1 and follow[0].op == Op.SPLIT else None
            if inner is not None and inner.attrs["axis"] in (-1, n.output.type.rank - 1) and n.output not in g.outputs:
                sizes += list(inner.attrs["sizes"])  # fold the member's own last-axis split into the fused one
                outputs += inner.outputs
                absorbed.append(inner)
            else:
                sizes.append(n.output.type.shape[-1])
                outputs.append(n.output)
        linear = Node(Op.LINEAR, node_name, tuple(fused_inputs), (out,), {}, meta)
        split = Node(
            Op.SPLIT,
            fresh(f"{node_name}/split", node=True),
            (out,),
            tuple(outputs),
            {"axis": -1, "sizes": tuple(sizes)},
            meta,
        )
        gone = {id(n) for n in members + absorbed}
        # Every member reads x, so x is defined before the first of them, and all their users come after it.
        at = min(g.nodes.index(n) for n in members)
        g.nodes = [*g.nodes[:at], linear, split, *(n for n in g.nodes[at:] if id(n) not in gone)]
        for w in {v.name for n in members for v in n.inputs[1:]}:
            if not any(v.name == w for n in g.nodes for v in n.inputs):
                del g.weights[w]
        return len(members) + len(absorbed) - 2


def _insert_before(weights: dict[str, Weight], anchor: str, new: Weight) -> dict[str, Weight]:
    """``weights`` with ``new`` placed just before ``anchor`` (engines write weights in this order)."""
    out: dict[str, Weight] = {}
    for name, w in weights.items():
        if name == anchor:
            out[new.name] = new
        out[name] = w
    return out
