"""The compile driver: checkpoint -> IR -> passes -> backend engine + manifest, with a stage report."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc import __version__
from dsc.files import sha256_files
from dsc.errors import CompileError
from dsc.ir.graph import Graph, Op
from dsc.passes.manager import PassManager
from dsc.passes.pipeline import build_pipeline
from dsc.runtime.engine import manifest_path

BACKENDS = {".onnx": "onnx", ".plan": "tensorrt", ".engine": "tensorrt"}


@dataclass
class CompileOptions:
    passes: list[str] | None = None  # None = the default pipeline
    disable_passes: tuple[str, ...] = ()
    backend: str | None = None  # None = from the output suffix
    print_ir_after_all: bool = False
    print_ir_after_change: bool = False
    dump_ir_dir: Path | None = None
    external_data: bool | None = None  # None = only when the weights pass 2 GB
    moe_lowering: str = "contrib"  # fused experts in ONNX: onnxruntime's MoE kernel, or "gather" (standard ops)
    quantize: str = "auto"  # auto: as stored (native FP8 stays FP8); fp8: quantize linear weights; none: all fp32
    report: bool = False  # print per-layer quantization error
    calibration_prompts: Path | None = None  # with report: logit error and top-1 agreement vs unquantized
    # TensorRT plans (backend "tensorrt"): profile ranges, precision, workspace, timing cache
    max_batch: int = 1
    max_seq_len: int = 4096
    opt_seq_len: int | None = None
    precision: str = "fp32"
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None
    ep_size: int = 1  # > 1: expert-parallel engines for this many ranks in the output directory
    placement: Path | None = None  # placement.json (dsc place) for the expert-parallel engines


@dataclass
class CompileSummary:
    output: Path
    files: list[Path]
    stages: dict[str, float] = field(default_factory=dict)
    params: int = 0
    active_params: int = 0
    nodes: int = 0
    engine_bytes: int = 0
    kv_bytes_per_token: int = 0
    checkpoint_bytes: int = 0
    peak_rss_bytes: int = 0
    baseline_rss_bytes: int = 0
    passes: list[dict[str, Any]] = field(default_factory=list)

    def lines(self) -> list[str]:
        mb = 1024 * 1024
        growth = self.peak_rss_bytes - self.baseline_rss_bytes
        return [
            f"engine       {self.output} ({self.engine_bytes / mb:.1f} MB in {len(self.files)} file(s))",
            f"params       {self.params:,} total, {self.active_params:,} active per token",
            f"graph        {self.nodes} IR nodes",
            f"kv cache     {self.kv_bytes_per_token:,} bytes per token (all layers)",
            "stages       " + ", ".join(f"{k} {v:.2f}s" for k, v in self.stages.items()),
            f"peak memory  {self.peak_rss_bytes / mb:.0f} MB RSS, +{growth / mb:.0f} MB over the "
            f"{self.baseline_rss_bytes / mb:.0f} MB baseline (checkpoint {self.checkpoint_bytes / mb:.0f} MB)",
        ]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process image's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across fork and exec, so a
    compile started from a big parent process would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def active_params(graph: Graph) -> int:
    """Parameters read per token: all weights but the unchosen routed experts and all but one embedding row."""
    total = graph.param_count()
    inactive = 0
    for node in graph.nodes:
        if node.op == Op.EMBEDDING:
            table = node.inputs[1].type.shape
            inactive += (table[0] - 1) * table[1]
        if node.op == Op.MOE_ROUTE:
            layer_prefix = node.inputs[1].name.rsplit(".gate.", 1)[0] + ".experts."
            routed = sum(
                w.value.type.numel() or 0 for name, w in graph.weights.items() if name.startswith(layer_prefix)
            )
            e, k = node.attrs["num_experts"], node.attrs["top_k"]
            inactive += routed * (e - k) // e
    return total - inactive


def kv_cache_layout(graph: Graph) -> list[dict[str, Any]]:
    tensors = []
    outputs = {v.name: v for v in graph.outputs}
    for v in graph.inputs:
        if v.name.startswith("past_key_values."):
            out = v.name.replace("past_key_values.", "present.")
            assert out in outputs, f"cache input {v.name} has no output {out}"
            tensors.append({"input": v.name, "output": out, "shape": list(v.type.shape), "dtype": v.type.dtype.value})
    return tensors


def kv_bytes_per_token(graph: Graph) -> int:
    total = 0
    for v in graph.inputs:
        if v.name.startswith("past_key_values."):
            per_token = 1
            for d in v.type.shape:
                if isinstance(d, int):
                    per_token *= d
            total += per_token * v.type.dtype.itemsize
    return total


_KV_LAYOUTS = {
    "naive": "per layer key [batch, past, heads, qk_head_dim] and value [batch, past, heads, v_head_dim]",
    "latent": "per layer one latent [batch, past, kv_lora_rank + qk_rope_head_dim]: normalized c_kv then rotated k_pe",
}


def build_manifest(graph: Graph, checkpoint, files: list[Path], pm: PassManager, backend: str) -> dict[str, Any]:
    cfg = checkpoint.config
    skipped = graph.meta.get("skipped_keys", [])
    return {
        "format": "dsc-engine",
        "format_version": 1,
        "dsc_version": __version__,
        "backend": backend,
        "engine_file": files[0].name if files else None,
        "data_files": [p.name for p in files[1:]],
        "model": {"config": cfg.to_dict()},
        "io": {"inputs": [v.describe() for v in graph.inputs], "outputs": [v.describe() for v in graph.outputs]},
        "kv_cache": {
            "form": graph.meta.get("kv_cache_form", "naive"),
            "layout": _KV_LAYOUTS[graph.meta.get("kv_cache_form", "naive")],
            "bytes_per_token": kv_bytes_per_token(graph),
            "tensors": kv_cache_layout(graph),
        },
        "weights": {"params": graph.param_count(), "active_params_per_token": active_params(graph)},
        "passes": [
            {
                "name": r.name,
                "modified": r.modified,
                "stats": r.stats,
                "nodes_before": r.nodes_before,
                "nodes_after": r.nodes_after,
            }
            for r in pm.records
        ],
        "skipped": {
            "mtp_layers": cfg.num_nextn_predict_layers,
            "tensors": len(skipped),
            "note": "multi-token-prediction layers (num_nextn_predict_layers) are not compiled; "
            "transformers and DeepSeek's converter skip them too"
            if cfg.num_nextn_predict_layers
            else "",
        },
        "tokenizer": None,
        "checksum": {"algorithm": "sha256", "files": [p.name for p in files], "value": sha256_files(files)},
    }


def compile_model(
    model: str | Path,
    output: str | Path,
    options: CompileOptions | None = None,
    log: Callable[[str], None] = print,
) -> CompileSummary:
    from dsc.files import atomic_write_bytes, check_writable_dir
    from dsc.backends.onnx import lower_to_onnx
    from dsc.backends.onnx_io import save_model
    from dsc.frontends.loader import load_graph

    options = options or CompileOptions()
    output = Path(output)
    backend = options.backend or ("onnx" if options.ep_size > 1 else BACKENDS.get(output.suffix.lower()))
    if options.ep_size > 1 and (backend != "onnx" or output.suffix):
        raise CompileError(f"{output}: --ep-size writes a directory of ONNX engines; give -o a directory name")
    if backend is None:
        raise CompileError(f"{output}: unknown output type '{output.suffix}'; use .onnx (ONNX) or .plan (TensorRT)")
    if backend == "tensorrt":
        from dsc.backends.tensorrt import profiles_from_flags
        from dsc.backends.tensorrt_support import require_tensorrt

        profiles = profiles_from_flags(options.max_batch, options.max_seq_len, options.opt_seq_len)  # check first
        require_tensorrt()
    check_writable_dir(output)
    baseline = current_rss_bytes()
    stages: dict[str, float] = {}

    def stage(name: str, start: float) -> float:
        now = time.perf_counter()
        stages[name] = now - start
        log(f"  {name:<8} {stages[name]:6.2f}s")
        return now

    t = time.perf_counter()
    log(f"[1/4] reading {model}")
    if options.quantize not in ("auto", "fp8", "none"):
        raise CompileError(f"--quantize must be auto, fp8 or none, not '{options.quantize}'")
    prompts = None
    if options.calibration_prompts is not None:  # read before any work: a bad file must not cost a compile
        from dsc.commands.quant_report import read_prompts

        prompts = read_prompts(options.calibration_prompts)
    checkpoint, graph = load_graph(model, keep_fp8=options.quantize != "none")
    unquantized = graph
    log(
        f"      {checkpoint.config.model_type}: {checkpoint.config.num_hidden_layers} layers, "
        f"{graph.param_count():,} params, {len(graph.nodes)} IR nodes"
    )
    t = stage("trace", t)
    log("[2/4] running passes")
    pm = PassManager(
        build_pipeline(options.passes, options.disable_passes, quantize=options.quantize == "fp8"),
        print_ir_after_all=options.print_ir_after_all,
        print_ir_after_change=options.print_ir_after_change,
        dump_ir_dir=options.dump_ir_dir,
        emit=log,
    )
    graph = pm.run(graph)
    for r in pm.records:
        log(
            f"      {r.name}: {'changed' if r.modified else 'unchanged'} {r.nodes_before}->{r.nodes_after} nodes "
            f"{json.dumps(r.stats, sort_keys=True)}"
        )
    t = stage("passes", t)
    if options.ep_size > 1:
        return _compile_ep(graph, checkpoint, pm, output, options, log, stages, baseline, t)
    if backend == "tensorrt":
        from dsc.backends.tensorrt import build_engine

        log(f"[3/4] building the TensorRT plan {output} ({options.precision})")
        build_engine(
            graph,
            output,
            profiles=profiles,
            precision=options.precision,
            workspace_bytes=options.workspace_bytes,
            timing_cache=options.timing_cache,
            log=log,
            checkpoint=checkpoint,
            pass_manager=pm,
        )
        stages["build"] = time.perf_counter() - t
        files = [output]
        return _summary(
            output,
            files,
            graph,
            checkpoint,
            stages,
            peak_rss_bytes(),
            baseline,
            json.loads(manifest_path(output).read_text())["passes"],
        )
    log("[3/4] lowering to ONNX (opset 21)")
    onnx_model, initializers = lower_to_onnx(graph, producer_version=__version__, moe_lowering=options.moe_lowering)
    t = stage("lower", t)
    total = sum(i.nbytes for i in initializers)
    log(f"[4/4] writing {output} ({total / 2**20:.1f} MB of weights)")
    last = [0]

    def progress(done: int, all_bytes: int) -> None:
        pct = 100 * done // max(all_bytes, 1)
        if pct >= last[0] + 10 or done == all_bytes:
            last[0] = pct
            log(f"      {pct:3d}%  {done / 2**20:8.1f} MB")

    files = save_model(onnx_model, initializers, output, external_data=options.external_data, progress=progress)
    written = list(files)
    try:
        manifest = build_manifest(graph, checkpoint, files, pm, backend)
        if checkpoint.tokenizer_path is not None:
            tok = output.with_name(output.stem + ".tokenizer.json")
            atomic_write_bytes(tok, checkpoint.tokenizer_path.read_bytes())
            written.append(tok)
            manifest["tokenizer"] = tok.name
        atomic_write_bytes(manifest_path(output), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    except BaseException:
        for p in written:  # never leave an engine without its manifest
            p.unlink(missing_ok=True)
        raise
    stage("write", t)
    peak = peak_rss_bytes()  # before the report, which runs the model
    if options.report:
        _report(graph, unquantized, output, prompts, log)
    return _summary(output, files, graph, checkpoint, stages, peak, baseline, manifest["passes"])


def _compile_ep(
    graph, checkpoint, pm, output: Path, options: CompileOptions, log, stages, baseline, t
) -> CompileSummary:
    import shutil

    from dsc.backends.ep import load_placement, write_ep_engines

    placement = load_placement(options.placement) if options.placement is not None else None
    if placement is not None:
        graph.meta["placement"] = placement  # recorded in the IR; the manifest carries it too
    log(f"[3/4] lowering and writing {options.ep_size} ranks' engines to {output}/")
    created = not output.exists()
    base = build_manifest(graph, checkpoint, [], pm, "onnx")
    try:
        files = write_ep_engines(
            graph, output, options.ep_size, placement, moe_lowering=options.moe_lowering, manifest_base=base, log=log
        )
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)  # never leave half an engine directory behind
        raise
    now = time.perf_counter()
    stages["write"] = now - t
    return _summary(output, files, graph, checkpoint, stages, peak_rss_bytes(), baseline, base["passes"])


def _summary(output, files, graph, checkpoint, stages, peak, baseline, passes) -> CompileSummary:
    return CompileSummary(
        output=output,
        files=files,
        stages=stages,
        params=graph.param_count(),
        active_params=active_params(graph),
        nodes=len(graph.nodes),
        engine_bytes=sum(p.stat().st_size for p in files),
        kv_bytes_per_token=kv_bytes_per_token(graph),
        checkpoint_bytes=sum(p.stat().st_size for p in checkpoint.files),
        peak_rss_bytes=peak,
        baseline_rss_bytes=baseline,
        passes=passes,
    )


def _report(graph: Graph, unquantized: Graph, output: Path, prompts: list[list[int]] | None, log) -> None:
    from dsc.commands import quant_report
    from dsc.runtime.engine import load_engine

    errors = quant_report.weight_errors(graph)
    if not errors:
        log("report: no weight was quantized by this compile (use --quantize fp8)")
    else:
        log(f"report: FP8 block quantization of {len(errors)} weights (relative Frobenius error)")
        for line in quant_report.per_layer(errors):
            log("  " + line)
    if prompts is not None:
        rel, agree = quant_report.calibration(unquantized, load_engine(output), prompts)
        log(
            f"report: {len(prompts)} calibration prompts: max relative logit error {rel:.3g}, top-1 agreement "
            f"{agree:.2%} (engine vs the unquantized reference)"
        )
