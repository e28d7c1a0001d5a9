"""Expert-parallel engines: the model cut at its MoE layers, dense segments shared by all ranks, and per rank
one small engine per MoE layer holding only the experts that rank's physical slots carry (DESIGN.md §6).

Layout of the output directory:
    segment{k}.onnx                 dense part k (attention, norms, router, shared experts, head)
    rank{r}.layer{L}.experts.onnx   rank r's experts of MoE layer L: (x[P, H], w[P, 1], slot[P, 1]) -> y[P, H]
    ep.manifest.json                segments' I/O, the MoE cuts, files per rank, the placement, checksums
"""

from __future__ import annotations

import logging
from pathlib import Path

from dsc import __version__
from dsc.backends.onnx import lower_to_onnx
from dsc.backends.onnx_io import save_model
from dsc.engine_format import ExpertParallel, Manifest, MoeCut, Segment, TensorSpec, finish_engine
from dsc.errors import CompileError
from dsc.ir.graph import Graph, GraphBuilder, Node, Op, Stacked, Transformed
from dsc.ir.partition import split_at
from dsc.ir.types import DType
from dsc.placement import Placement

log = logging.getLogger("dsc")


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
    b.output(
        b.op(
            Op.MOE_EXPERTS, [x, w, slot, *weights], {**node.attrs, "num_experts": len(phy2log_rank)}, out_names=["y"]
        ).output
    )
    return b.graph


def write_ep_engines(graph: Graph, out_dir: Path, ranks: int, *, moe_lowering: str) -> Manifest:
    """Write the dense segments and every rank's expert engines into ``out_dir``, then the manifest. The
    placement is ``graph.meta["placement"]`` (the expert-placement pass) or, without one, one slot per expert."""
    cuts = [n for n in graph.nodes if n.op == Op.MOE_EXPERTS]
    if not cuts:
        raise CompileError("--ep-size needs fused MoE layers (do not disable expert-fusion)")
    if any(n.op == Op.MOE_COMBINE for n in graph.nodes):
        raise CompileError("--ep-size: some MoE layers were not fused; see the expert-fusion stats")
    experts = cuts[0].attrs["num_experts"]
    placement = graph.meta.get("placement") or Placement.default(len(cuts), experts, ranks)
    placement.check(len(cuts), experts, ranks, "--placement")
    out_dir.mkdir(parents=True, exist_ok=True)
    part = split_at(graph)
    files: list[Path] = []
    segments = []
    for k, seg in enumerate(part.segments):
        model, inits = lower_to_onnx(seg, producer_version=__version__, moe_lowering=moe_lowering)
        files += save_model(model, inits, out_dir / f"segment{k}.onnx")
        segments.append(
            Segment(f"segment{k}.onnx", tuple(TensorSpec.of(v) for v in seg.inputs), tuple(v.name for v in seg.outputs))
        )
        log.info("      segment%d.onnx: %d IR nodes", k, len(seg.nodes))
    layer_cuts, rank_files = [], [[] for _ in range(ranks)]
    for k, node in enumerate(part.cuts):
        layer = graph.layer_of(node)
        w, idx = node.inputs[1], node.inputs[2]
        layer_cuts.append(MoeCut(layer, node.inputs[0].name, w.name, idx.name, node.output.name, w.type.shape[-1]))
        for r in range(ranks):
            model, inits = lower_to_onnx(
                experts_graph(graph, node, placement.local_slots(k, r)),
                producer_version=__version__,
                moe_lowering=moe_lowering,
            )
            name = f"rank{r}.layer{layer}.experts.onnx"
            files += save_model(model, inits, out_dir / name)
            rank_files[r].append(name)
        log.info("      layer %d: %d expert engines, %d slots per rank", layer, ranks, placement.slots_per_rank)
    ep = ExpertParallel(ranks, tuple(segments), tuple(layer_cuts), tuple(tuple(f) for f in rank_files), placement)
    return finish_engine(graph, backend="onnx", engine=out_dir, files=files, expert_parallel=ep)
