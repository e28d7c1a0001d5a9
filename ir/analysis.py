"""Facts computed from a graph's structure: parameters read per token and cache bytes per token.

They read the IR's ops and metadata (``Graph.cache_entries``), never value or weight names."""

from __future__ import annotations

from dsc.ir.graph import Graph, Node, Op


def _routed_weights(graph: Graph, route: Node, producers: dict[str, Node], users: dict[str, list[Node]]) -> set[str]:
    """Weights of the routed experts fed by ``route`` (fused: the moe_experts stacks; unfused: every weight on
    the path from the router's input to each expert output of the moe_combine)."""
    x = route.inputs[0].name
    mixers = [n for n in users.get(route.outputs[0].name, []) if n.op in (Op.MOE_EXPERTS, Op.MOE_COMBINE)]
    weights: set[str] = set()
    for mixer in mixers:
        if mixer.op == Op.MOE_EXPERTS:
            weights.update(v.name for v in mixer.inputs[3:] if v.name in graph.weights)
            continue
        stack = [v.name for v in mixer.inputs[2:]]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen or name == x:
                continue
            seen.add(name)
            if name in graph.weights:
                weights.add(name)
            elif name in producers:
                stack.extend(v.name for v in producers[name].inputs)
    return weights


def active_params(graph: Graph) -> int:
    """Parameters read per token: all weights but the unchosen routed experts and all but one embedding row."""
    producers, users = graph.producers(), graph.consumers()
    inactive = 0
    for node in graph.nodes:
        if node.op == Op.EMBEDDING:
            table = node.inputs[1].type.shape
            inactive += (table[0] - 1) * table[1]
        if node.op == Op.MOE_ROUTE:
            routed = sum(
                graph.weights[w].value.type.numel() or 0 for w in _routed_weights(graph, node, producers, users)
            )
            e, k = node.attrs["num_experts"], node.attrs["top_k"]
            inactive += routed * (e - k) // e
    return graph.param_count() - inactive


def kv_bytes_per_token(graph: Graph) -> int:
    """Cache bytes one token adds, over all layers (the static dims of every cache input)."""
    inputs = {v.name: v for v in graph.inputs}
    total = 0
    for entry in graph.cache_entries():
        v = inputs[entry.past]
        per_token = 1
        for d in v.type.shape:
            if isinstance(d, int):
                per_token *= d
        total += per_token * v.type.dtype.itemsize
    return total
