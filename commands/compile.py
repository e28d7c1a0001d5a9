"""The compile driver: checkpoint -> IR -> passes -> backend engine + manifest, with a stage report."""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsc.backends import (
    Backend,
    ExpertParallelBackend,
    GenaiFolderBackend,
    OnnxBackend,
    TensorRTBackend,
    backend_kind,
)
from dsc.engine_format import Manifest, folder_engine
from dsc.errors import CompileError
from dsc.files import check_writable_dir
from dsc.ir.graph import Graph
from dsc.ir.types import DType
from dsc.passes.manager import PassManager
from dsc.passes.pipeline import build_pipeline
from dsc.prompts import read_prompt_file

log = logging.getLogger("dsc")
QUANTIZE = ("auto", "int8", "int4", "fp8", "none")


@dataclass
class CompileOptions:
    passes: str | list[str] | None = None  # a pass spec ("a{opt=v},b") or names; None = the default pipeline
    disable_passes: tuple[str, ...] = ()
    pass_options: dict[str, dict[str, str]] = field(default_factory=dict)  # {pass: {option: text}}
    backend: str | None = None  # None = from the output suffix
    print_ir_after_all: bool = False
    print_ir_after_change: bool = False
    dump_ir_dir: Path | None = None
    external_data: bool | None = None  # None = only when the weights pass 2 GB
    moe_lowering: str = "contrib"  # fused experts in ONNX: onnxruntime's MoE kernel, or "gather" (standard ops)
    # auto: as stored, except that native FP8 runs as int8 on onnxruntime (which has no FP8 GEMM on CPU);
    # int8/int4: weight-only block quantization run by onnxruntime's low-bit kernels; fp8: DeepSeek's FP8
    # format (TensorRT; onnxruntime folds it to float32 at load); none: everything float32
    quantize: str = "auto"
    report: bool = False  # print per-layer quantization error
    calibration_prompts: Path | None = None  # with report: logit error and top-1 agreement vs unquantized
    # TensorRT plans (backend "tensorrt"): profile ranges, precision, workspace, timing cache
    max_batch: int = 1
    max_seq_len: int = 4096
    opt_seq_len: int | None = None
    prefill_chunk: int = 512  # most prompt tokens per step (the prefill profile)
    precision: str = "fp32"
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None
    ep_size: int = 1  # > 1: expert-parallel engines for this many ranks in the output directory
    placement: Path | None = None  # placement.json (dsc place): runs the expert-placement pass


@dataclass
class CompileSummary:
    output: Path
    manifest: Manifest
    stages: dict[str, float] = field(default_factory=dict)
    nodes: int = 0
    engine_bytes: int = 0
    checkpoint_bytes: int = 0
    peak_rss_bytes: int = 0
    baseline_rss_bytes: int = 0

    @property
    def files(self) -> list[Path]:
        root = self.output if self.manifest.expert_parallel is not None else folder_engine(self.output).parent
        return [root / f for f in self.manifest.files]

    def lines(self) -> list[str]:
        mb = 1024 * 1024
        m = self.manifest
        growth = self.peak_rss_bytes - self.baseline_rss_bytes
        return [
            f"engine       {self.output} ({self.engine_bytes / mb:.1f} MB in {len(m.files)} file(s))",
            f"params       {m.params:,} total, {m.active_params_per_token:,} active per token",
            f"graph        {self.nodes} IR nodes",
            f"kv cache     {m.kv_cache.bytes_per_token:,} bytes per token (all layers)",
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


def make_backend(output: Path, options: CompileOptions) -> Backend:
    """The backend the output path and flags ask for; its flags are checked before any work."""
    kind = backend_kind(output, options.backend, options.ep_size)
    if kind == "onnx-ep":
        return ExpertParallelBackend(options.ep_size, options.moe_lowering)
    if kind == "tensorrt":
        from dsc.backends.tensorrt import profiles_from_flags
        from dsc.backends.tensorrt_support import require_tensorrt

        profiles = profiles_from_flags(  # check first
            options.max_batch, options.max_seq_len, options.opt_seq_len, options.prefill_chunk
        )
        require_tensorrt()
        return TensorRTBackend(profiles, options.precision, options.workspace_bytes, options.timing_cache)
    if kind == "onnx-genai":
        return GenaiFolderBackend(options.moe_lowering, options.external_data)
    return OnnxBackend(options.moe_lowering, options.external_data)


def quantize_mode(options: CompileOptions, backend: Backend, has_fp8: bool) -> str | None:
    """The quantization pass this compile runs (a ``QUANTIZE_PASSES`` key), or None."""
    if options.quantize in ("int8", "int4", "fp8"):
        return options.quantize
    if options.quantize == "auto" and has_fp8 and backend.name != "tensorrt":
        return "int8"  # onnxruntime would fold FP8 to float32 at load: 4x the checkpoint in RAM
    return None


def make_pass_manager(options: CompileOptions, quantize: str | None = None) -> PassManager:
    extra = [("expert-placement", {"placement": str(options.placement)})] if options.placement is not None else []
    passes = build_pipeline(
        options.passes,
        options.disable_passes,
        quantize=quantize,
        options=options.pass_options,
        extra=extra,
    )
    return PassManager(
        passes,
        print_ir_after_all=options.print_ir_after_all,
        print_ir_after_change=options.print_ir_after_change,
        dump_ir_dir=options.dump_ir_dir,
    )


def compile_model(model: str | Path, output: str | Path, options: CompileOptions | None = None) -> CompileSummary:
    from dsc.frontends.checkpoint import Checkpoint
    from dsc.frontends.loader import trace_checkpoint

    options = options or CompileOptions()
    output = Path(output)
    if options.quantize not in QUANTIZE:
        raise CompileError(f"--quantize must be one of {', '.join(QUANTIZE)}, not '{options.quantize}'")
    if options.quantize in ("int8", "int4") and backend_kind(output, options.backend, options.ep_size) == "tensorrt":
        raise CompileError(
            f"--quantize {options.quantize} runs in onnxruntime's CPU kernels; TensorRT plans take --quantize fp8 "
            "(or compile to .onnx)"
        )
    backend = make_backend(output, options)
    check_writable_dir(output)
    if options.dump_ir_dir is not None:  # a debugging aid, kept when the compile fails later
        try:
            Path(options.dump_ir_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CompileError(
                f"{options.dump_ir_dir}: cannot create the --dump-ir-dir directory: {exc.strerror}"
            ) from None
    pm = make_pass_manager(options, quantize_mode(options, backend, has_fp8=False))  # checked before any work
    # every input is checked before any work: the checkpoint's headers and config.json, then the prompts
    # against its vocabulary, then tracing
    checkpoint = Checkpoint.open(model)
    prompts = None
    if options.calibration_prompts is not None:
        prompts = read_prompt_file(options.calibration_prompts, checkpoint.config.vocab_size, checkpoint.tokenizer_path)
    baseline = current_rss_bytes()
    stages: dict[str, float] = {}

    def stage(name: str, start: float) -> float:
        now = time.perf_counter()
        stages[name] = now - start
        log.info(f"  {name:<8} {stages[name]:6.2f}s")
        return now

    t = time.perf_counter()
    log.info(f"[1/4] reading {model}")
    checkpoint, graph = trace_checkpoint(checkpoint, keep_fp8=options.quantize != "none")
    unquantized = graph
    mode = quantize_mode(
        options, backend, has_fp8=any(w.value.type.dtype == DType.F8E4M3 for w in graph.weights.values())
    )
    if mode == "int8" and options.quantize == "auto":
        log.info("      native FP8 weights: running them as int8 on onnxruntime (--quantize fp8 keeps FP8)")
        pm = make_pass_manager(options, mode)
    log.info(
        f"      {checkpoint.config.model_type}: {checkpoint.config.num_hidden_layers} layers, "
        f"{graph.param_count():,} params, {len(graph.nodes)} IR nodes"
    )
    t = stage("trace", t)
    log.info("[2/4] running passes")
    graph = pm.run(graph)
    for r in pm.records:
        log.info(
            f"      {r.name}: {'changed' if r.modified else 'unchanged'} {r.nodes_before}->{r.nodes_after} nodes "
            f"{json.dumps(r.stats, sort_keys=True)}"
        )
    t = stage("passes", t)
    manifest = backend.write(graph, output)
    stage("write", t)
    peak = peak_rss_bytes()  # before the report, which runs the model
    summary = CompileSummary(output, manifest, stages, len(graph.nodes), 0, 0, peak, baseline)
    if options.report:
        try:
            _report(graph, unquantized, output, prompts)
        except BaseException:  # a failed or interrupted compile leaves no engine behind, even a complete one
            remove_engine(summary)
            raise
    summary.engine_bytes = sum(p.stat().st_size for p in summary.files)
    summary.checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.files)
    return summary


def remove_engine(summary: CompileSummary) -> None:
    import shutil

    from dsc.engine_format import manifest_path, tokenizer_config_path

    if summary.manifest.expert_parallel is not None or summary.output.is_dir():  # a model folder goes whole
        shutil.rmtree(summary.output, ignore_errors=True)
        return
    tok = summary.output.parent / summary.manifest.tokenizer if summary.manifest.tokenizer else None
    extra = [tok, tokenizer_config_path(tok)] if tok is not None else []
    for p in [*summary.files, *extra, manifest_path(summary.output)]:
        p.unlink(missing_ok=True)


def _report(graph: Graph, unquantized: Graph, output: Path, prompts: list[list[int]] | None) -> None:
    from dsc.commands import quant_report
    from dsc.runtime.engine import load_engine

    errors = quant_report.weight_errors(graph)
    if not errors:
        log.info("report: no weight was quantized by this compile (use --quantize int8, int4 or fp8)")
    else:
        log.info(f"report: block quantization of {len(errors)} weights (relative Frobenius error)")
        for line in quant_report.per_layer(errors):
            log.info("  " + line)
    if prompts is not None:
        rel, agree = quant_report.calibration(unquantized, load_engine(output), prompts)
        log.info(
            f"report: {len(prompts)} calibration prompts: max relative logit error {rel:.3g}, top-1 agreement "
            f"{agree:.2%} (engine vs the unquantized reference)"
        )
