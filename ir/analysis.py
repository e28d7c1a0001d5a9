"""Facts computed from a graph's structure: parameters read per token, cache bytes per token, and the storage
format of each group of weights.

They read the IR's ops and metadata (``Graph.cache_entries``); only ``weight_groups`` also reads the checkpoint's
weight names, to tell attention from MLP projections."""

from __future__ import annotations

from dsc.ir.graph import Graph, Node, Op, Weight
from dsc.ir.types import DType


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


def _group(graph: Graph, node: Node, logits: set[str]) -> str:
    if node.op == Op.EMBEDDING:
        return "embedding"
    if node.op == Op.MOE_ROUTE:
        return "router"
    if node.op == Op.MOE_EXPERTS:
        return "routed experts"
    if node.op == Op.RMS_NORM:
        return "norms"
    if node.op == Op.LINEAR and any(v.name in logits for v in node.outputs):
        return "lm_head"
    name = node.inputs[1].name if len(node.inputs) > 1 else ""
    if ".shared_experts." in name:
        return "shared experts"
    if ".self_attn." in name or node.op == Op.HEAD_LINEAR:
        return "attention"
    if ".mlp." in name:
        return "dense mlp"
    return "other"


def _format(node: Node, weight: Weight) -> str:
    dtype = weight.value.type.dtype
    if dtype == DType.I8:
        return f"int{node.attrs['bits']} block {node.attrs['block']}"
    if dtype == DType.F8E4M3:
        return "fp8 e4m3 128x128"
    return dtype.value


# Inputs that hold block scales of the node's other weights (counted in bytes, not in params or tensors).
_SCALE_INPUTS = {Op.LINEAR: range(2, 3), Op.MOE_EXPERTS: range(6, 9)}


def weight_groups(graph: Graph) -> list[dict]:
    """Per group of weights (attention, routed experts, lm_head, ...): storage format, tensors, params and bytes
    as the engine stores them (int4 levels at half a byte each; block scales counted with their weights)."""
    logits = {v.name for v in graph.outputs if v.name == "logits"}
    groups: dict[tuple[str, str], dict] = {}
    seen: set[str] = set()
    for node in graph.nodes:
        ws = [(i, graph.weights[v.name]) for i, v in enumerate(node.inputs) if v.name in graph.weights]
        ws = [(i, w) for i, w in ws if w.name not in seen]
        if not ws:
            continue
        seen.update(w.name for _, w in ws)
        key = (_group(graph, node, logits), _format(node, ws[0][1]))
        g = groups.setdefault(key, {"group": key[0], "format": key[1], "tensors": 0, "params": 0, "bytes": 0})
        for i, w in ws:
            n = w.value.type.numel() or 0
            if w.value.type.dtype == DType.I8:
                g["bytes"] += n * node.attrs["bits"] // 8
            else:
                g["bytes"] += w.nbytes
            if i not in _SCALE_INPUTS.get(node.op, ()):
                g["tensors"] += 1
                g["params"] += n
    return sorted(groups.values(), key=lambda g: -g["bytes"])
