"""Expert-parallel engines: the model cut at its MoE layers, dense segments shared by all ranks, and per rank
one small engine per MoE layer holding only the experts that rank's physical slots carry (DESIGN.md §6).

Layout of the output directory:
    segment{k}.onnx                 dense part k (attention, norms, router, shared experts, head)
    rank{r}.layer{L}.experts.onnx   rank r's experts of MoE layer L: (x[P, H], w[P, 1], slot[P, 1]) -> y[P, H]
    ep.manifest.json                segments' I/O, the MoE cuts, files per rank, the placement, checksums
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsc import __version__
from dsc.files import atomic_write_bytes, sha256_files
from dsc.backends.onnx import lower_to_onnx
from dsc.backends.onnx_io import save_model
from dsc.errors import CompileError
from dsc.ir.graph import Graph, GraphBuilder, Node, Op, Stacked, Transformed
from dsc.ir.partition import split_at
from dsc.ir.types import DType


def default_placement(layers: int, experts: int, ranks: int) -> dict[str, Any]:
    """No redundancy: slot s holds expert s, rank r the contiguous block of experts r*E/R ... ."""
    if experts % ranks:
        raise CompileError(
            f"--ep-size {ranks} does not divide the {experts} routed experts; give a --placement "
            "with redundant slots (dsc place --slots S --ranks R)"
        )
    phy2log = [list(range(experts)) for _ in range(layers)]
    return {
        "phy2log": phy2log,
        "log2phy": [[[e] for e in range(experts)] for _ in range(layers)],
        "logcnt": [[1] * experts for _ in range(layers)],
        "ranks": ranks,
        "slots": experts,
    }


def check_placement(placement: dict[str, Any], layers: int, experts: int, ranks: int, source: str) -> None:
    phy2log = placement.get("phy2log")
    if not isinstance(phy2log, list) or len(phy2log) != layers:
        raise CompileError(f"{source}: placement covers {len(phy2log or [])} MoE layers, the model has {layers}")
    slots = len(phy2log[0])
    if placement.get("ranks", ranks) != ranks or slots % ranks:
        raise CompileError(
            f"{source}: placement is for {placement.get('ranks')} ranks and {slots} slots; --ep-size is {ranks}"
        )
    for layer, row in enumerate(phy2log):
        if len(row) != slots or set(row) != set(range(experts)):
            raise CompileError(f"{source}: layer {layer}: phy2log must give every one of the {experts} experts a slot")


def load_placement(path: Path) -> dict[str, Any]:
    """A placement written by ``dsc place`` (or DeepSeek's EPLB layout): phy2log [layers][slots], ..."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompileError(f"{path}: cannot read placement: {exc}") from exc
    data = data.get("placement", data) if isinstance(data, dict) else None
    if not isinstance(data, dict) or "phy2log" not in data:
        raise CompileError(f"{path}: not a placement (needs 'phy2log' [layers][slots])")
    return data


def _subset(source, slots: list[int]):
    if isinstance(source, Stacked):
        return Stacked(source.name + "_local", tuple(source.parts[s] for s in slots))
    return Transformed("select_experts", (source,), lambda t, idx=tuple(slots): t[list(idx)].contiguous())


def experts_graph(full: Graph, node: Node, phy2log_rank: list[int]) -> Graph:
    """A rank's experts of one MoE layer: rows of tokens, each sent to one local slot with its routing weight."""
    b = GraphBuilder(Graph(f"experts.{node.name}"))
    hidden = node.inputs[0].type.shape[-1]
    x = b.input("x", node.inputs[0].type.dtype, ("rows", hidden))
    w = b.input("weight", DType.F32, ("rows", 1))
    slot = b.input("slot", DType.I64, ("rows", 1))
    weights = []
    for v in node.inputs[3:]:
        src = _subset(full.weights[v.name].source, phy2log_rank)
        weights.append(b.weight(v.name, v.type.dtype, (len(phy2log_rank), *v.type.shape[1:]), src))
    b.output(b.op(Op.MOE_EXPERTS, [x, w, slot, *weights], {"num_experts": len(phy2log_rank)}, out_names=["y"]).output)
    return b.graph


def write_ep_engines(
    graph: Graph,
    out_dir: Path,
    ranks: int,
    placement: dict[str, Any] | None,
    *,
    moe_lowering: str,
    manifest_base: dict[str, Any],
    log: Callable[[str], None],
) -> list[Path]:
    cuts = [n for n in graph.nodes if n.op == Op.MOE_EXPERTS]
    if not cuts:
        raise CompileError("--ep-size needs fused MoE layers (do not disable expert-fusion)")
    if any(n.op == Op.MOE_COMBINE for n in graph.nodes):
        raise CompileError("--ep-size: some MoE layers were not fused; see the expert-fusion stats")
    experts = cuts[0].attrs["num_experts"]
    if placement is None:
        placement = default_placement(len(cuts), experts, ranks)
    else:
        check_placement(placement, len(cuts), experts, ranks, "--placement")
    out_dir.mkdir(parents=True, exist_ok=True)
    part = split_at(graph)
    files: list[Path] = []
    segments = []
    for k, seg in enumerate(part.segments):
        model, inits = lower_to_onnx(seg, producer_version=__version__, moe_lowering=moe_lowering)
        files += save_model(model, inits, out_dir / f"segment{k}.onnx")
        segments.append(
            {
                "file": f"segment{k}.onnx",
                "inputs": [v.describe() for v in seg.inputs],
                "outputs": [v.name for v in seg.outputs],
            }
        )
        log(f"      segment{k}.onnx: {len(seg.nodes)} IR nodes")
    slots_per_rank = len(placement["phy2log"][0]) // ranks
    layer_cuts, rank_files = [], [[] for _ in range(ranks)]
    for k, node in enumerate(part.cuts):
        layer = int(node.name.split("/")[0].split(".")[1])
        layer_cuts.append(
            {
                "layer": layer,
                "x": node.inputs[0].name,
                "weights": node.inputs[1].name,
                "experts": node.inputs[2].name,
                "output": node.output.name,
                "top_k": node.inputs[1].type.shape[-1],
            }
        )
        for r in range(ranks):
            local = placement["phy2log"][k][r * slots_per_rank : (r + 1) * slots_per_rank]
            model, inits = lower_to_onnx(
                experts_graph(graph, node, local), producer_version=__version__, moe_lowering=moe_lowering
            )
            name = f"rank{r}.layer{layer}.experts.onnx"
            files += save_model(model, inits, out_dir / name)
            rank_files[r].append(name)
        log(f"      layer {layer}: {ranks} expert engines, {slots_per_rank} slots per rank")
    manifest = {
        **manifest_base,
        "format": "dsc-ep-engine",
        "ranks": ranks,
        "segments": segments,
        "moe_layers": layer_cuts,
        "rank_files": rank_files,
        "placement": {**placement, "ranks": ranks, "slots": len(placement["phy2log"][0])},
    }
    manifest["checksum"] = {"algorithm": "sha256", "files": [p.name for p in files], "value": sha256_files(files)}
    path = out_dir / "ep.manifest.json"
    atomic_write_bytes(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return [*files, path]
