"""Backends: each turns an optimized graph into engine files plus their manifest (dsc.engine_format).

A backend is a frozen dataclass whose fields are its options, with one method, ``write(graph, out) ->
Manifest``. Adding an output kind means writing its files and ending with ``finish_engine``; nothing else in the
compiler changes. ``backend_for`` picks the backend from the output path (``x.onnx``, ``x.plan``, a directory
with ``--ep-size``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from dsc.errors import CompileError

if TYPE_CHECKING:
    from dsc.backends.tensorrt import Profiles
    from dsc.engine_format import Manifest
    from dsc.ir.graph import Graph

log = logging.getLogger("dsc")

SUFFIXES = {".onnx": "onnx", ".plan": "tensorrt", ".engine": "tensorrt"}


class Backend(Protocol):
    name: ClassVar[str]

    def write(self, graph: Graph, out: Path) -> Manifest:
        """Write the engine for ``graph`` at ``out`` (files + manifest, atomically) and return its manifest."""
        ...


@dataclass(frozen=True)
class OnnxBackend:
    """One ONNX file for onnxruntime (+ ``.onnx.data`` past 2 GB or when asked)."""

    name: ClassVar[str] = "onnx"
    moe_lowering: str = "contrib"  # fused experts: onnxruntime's MoE kernel, or "gather" (standard ops)
    external_data: bool | None = None  # None: for int (low-bit) weights, or when they pass protobuf's 2 GB limit

    def write(self, graph: Graph, out: Path, **fields) -> Manifest:
        from dsc import __version__
        from dsc.backends.onnx import lower_to_onnx
        from dsc.backends.onnx_io import save_model
        from dsc.engine_format import finish_engine
        from dsc.ir.types import DType
        from tqdm import tqdm

        log.info("[3/4] lowering to ONNX (opset 21)")
        model, initializers = lower_to_onnx(graph, producer_version=__version__, moe_lowering=self.moe_lowering)
        total = sum(i.nbytes for i in initializers)
        log.info(f"[4/4] writing {out} ({total / 2**20:.1f} MB of weights)")
        quiet = not log.isEnabledFor(logging.INFO)
        external = self.external_data
        if external is None and any(w.value.type.dtype == DType.I8 for w in graph.weights.values()):
            # onnxruntime maps external data and drops each weight once its kernel has prepacked it; weights
            # inside the .onnx stay in memory beside their packed copies (bench preset int8: 191 vs 240 MB RSS)
            external = True
        with tqdm(total=total, unit="B", unit_scale=True, desc="      weights", disable=quiet or None) as bar:
            files = save_model(
                model,
                initializers,
                out,
                external_data=external,
                progress=lambda done, _total: bar.update(done - bar.n),
            )
        return finish_engine(graph, backend=self.name, engine=out, files=files, extra=kernel_facts(model), **fields)


@dataclass(frozen=True)
class GenaiFolderBackend:
    """A model folder for onnxruntime-genai (backends/genai.py): the ONNX engine, genai_config.json, tokenizer."""

    name: ClassVar[str] = "onnx-genai"
    moe_lowering: str = "contrib"
    external_data: bool | None = None

    def write(self, graph: Graph, out: Path) -> Manifest:
        from dsc.backends.genai import write_genai_folder

        return write_genai_folder(graph, out, OnnxBackend(self.moe_lowering, self.external_data).write)


def sparse_attention_facts(model) -> dict | None:
    """DeepSeek-V3.2 DSA's lowering form, for the manifest (backends/onnx.py _sparse_attention), or None."""
    ops = {node.op_type for node in model.graph.node}
    if "LayerNormalization" not in ops or not ops & {"If", "GatherND"}:  # only the V3.2 lowerings emit these
        return None
    prefill = "mask: dense scores with the unselected keys at -inf" if "If" in ops else "gather, as decode"
    return {
        "decode": "gather: the indexer's top-k latent rows (GatherND), then attention over them, O(top-k)",
        "prefill": prefill + " (chosen by measurement: README, DeepSeek-V3.2; benchmarks/bench_dsa.py)",
        "indexer": "O(T) per query: ReLU scores over the indexer key cache, TopK with lower position first on ties",
    }


def kernel_facts(model) -> dict:
    """What runs the weights, from the emitted ONNX: contrib kernels used, their accuracy levels and block sizes,
    and the prefill form (recorded in the manifest; ``dsc inspect`` shows the weight formats per group)."""
    counts: dict[str, int] = {}
    levels, blocks = set(), set()
    for node in model.graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for a in node.attribute:
                if a.name == "accuracy_level":
                    levels.add(a.i)
                if a.name == "block_size":
                    blocks.add(a.i)
    facts: dict = {}
    sparse = sparse_attention_facts(model)
    if sparse is not None:
        facts["sparse_attention"] = sparse
    if not counts:
        return facts
    facts["contrib_kernels"] = counts
    if levels:
        facts["accuracy_level"] = sorted(levels)
        facts["int_blocks"] = sorted(blocks)
        facts["zero_points"] = "none: symmetric levels, the kernels' default zero point 2^(bits-1)"
        # One graph serves prefill and decode: at M=128, 8-bit MatMulNBits is slower than float32 MatMul and
        # 4-bit about even, while QMoE stays faster (issue 11, bench_llamacpp.py); a float copy of the weights for
        # prefill would undo the memory saving, so prefill runs the same low-bit kernels.
        facts["prefill"] = "same low-bit kernels as decode (int8 activations)"
    return facts


@dataclass(frozen=True)
class TensorRTBackend:
    """A TensorRT plan (needs ``tensorrt`` and an NVIDIA GPU)."""

    name: ClassVar[str] = "tensorrt"
    profiles: Profiles
    precision: str = "fp32"
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None

    def write(self, graph: Graph, out: Path) -> Manifest:
        from dsc.backends.tensorrt import build_engine
        from dsc.engine_format import read_manifest

        log.info(f"[3/4] building the TensorRT plan {out} ({self.precision})")
        build_engine(
            graph,
            out,
            profiles=self.profiles,
            precision=self.precision,
            workspace_bytes=self.workspace_bytes,
            timing_cache=self.timing_cache,
        )
        return read_manifest(out)


@dataclass(frozen=True)
class ExpertParallelBackend:
    """A directory of ONNX engines for ``ranks`` processes: dense segments + each rank's experts."""

    name: ClassVar[str] = "onnx-ep"
    ranks: int
    moe_lowering: str = "contrib"

    def write(self, graph: Graph, out: Path) -> Manifest:
        import shutil

        from dsc.backends.ep import write_ep_engines

        log.info(f"[3/4] lowering and writing {self.ranks} ranks' engines to {out}/")
        created = not out.exists()
        try:
            return write_ep_engines(graph, out, self.ranks, moe_lowering=self.moe_lowering)
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)  # never leave half an engine directory behind
            raise


def backend_kind(out: Path, backend: str | None, ep_size: int) -> str:
    """ "onnx", "tensorrt", "onnx-ep" or "onnx-genai" (a path without a suffix: an onnxruntime-genai model folder),
    from the flags and the output path; CompileError when they disagree."""
    if ep_size > 1:
        if backend not in (None, "onnx") or out.suffix:
            raise CompileError(f"{out}: --ep-size writes a directory of ONNX engines; give -o a directory name")
        return "onnx-ep"
    if not out.suffix and backend in (None, "onnx"):
        return "onnx-genai"
    kind = backend or SUFFIXES.get(out.suffix.lower())
    if kind is None:
        raise CompileError(
            f"{out}: unknown output type '{out.suffix}'; use .onnx (ONNX), .plan (TensorRT) or a folder name without a "
            "suffix (onnxruntime-genai)"
        )
    return kind
