"""IR -> TensorRT plan: the ONNX flavour TensorRT parses, optimization profiles, and the engine build.

The plan is built from the same ONNX lowering as ``.onnx`` engines (backends/onnx.py), with fused experts
lowered to standard ops (``moe_lowering="gather"``: TensorRT has no com.microsoft MoE) and checked against the
kept support list (backends/tensorrt_ops.py). One optimization profile serves prefill and decode.

Entry points the CLI uses (``dsc compile -o model.plan``):
    profiles = profiles_from_flags(max_batch, max_seq_len, opt_seq_len)     # --max-batch --max-seq-len --opt-seq-len
    build_engine(graph, plan, profiles=profiles, precision=..., workspace_bytes=..., timing_cache=...)
and ``dsc run model.plan`` loads the result with runtime/tensorrt_engine.TensorRTEngine.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
from dsc.backends.onnx import lower_to_onnx
from dsc.backends.onnx_io import ONNX_DTYPES, Initializer
from dsc.backends.tensorrt_ops import check_model_supported, support_summary
from dsc.errors import CompileError
from dsc.ir.graph import Graph, Op

log = logging.getLogger("dsc")

PRECISIONS = ("fp32", "fp16", "bf16")
# Opset 21 is needed only for blocked Q/DQ (``block_size``); every other op dsc emits means the same at 20, and
# TensorRT 10.0-10.x parse opsets up to 20 (onnx-tensorrt operators.md, 10.1-GA).
_OPSET_WITHOUT_BLOCKS = 20
_SMALL_CONSTANT_BYTES = 1024  # constants read while checking the model (shape vectors, axes, K)


def _flag_int(flag: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CompileError(f"{flag} must be a positive integer, not {value!r}")
    return value


@dataclass(frozen=True)
class Profiles:
    """The one optimization profile: min/opt/max of the ``batch`` and ``seq`` dims, and the largest ``past``.

    Prefill runs seq = prompt length with past 0; decode runs seq 1 with past up to max_seq - 1; so the
    profile spans seq 1..max_seq and past 0..max_past. ``opt`` is the shape TensorRT tunes kernels for: a
    decode step over a half-full cache by default (where generation spends its time), or an ``opt_seq``-token
    prefill when one is asked for.
    """

    min_batch: int
    opt_batch: int
    max_batch: int
    min_seq: int
    opt_seq: int
    max_seq: int
    max_past: int

    def __post_init__(self) -> None:
        for dim in ("batch", "seq"):
            lo, opt, hi = (getattr(self, f"{k}_{dim}") for k in ("min", "opt", "max"))
            if not 1 <= lo <= opt <= hi:
                raise CompileError(f"profile {dim}: need 1 <= min <= opt <= max, got {lo}, {opt}, {hi}")
        if self.max_past < 0:
            raise CompileError(f"profile past: max must be >= 0, got {self.max_past}")

    @property
    def opt_past(self) -> int:
        return 0 if self.opt_seq > 1 else self.max_past // 2

    def ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each symbolic dimension of the engine's inputs."""
        return {
            "batch": (self.min_batch, self.opt_batch, self.max_batch),
            "seq": (self.min_seq, self.opt_seq, self.max_seq),
            "past": (0, self.opt_past, self.max_past),
        }

    def shapes_for(
        self, input_name: str, onnx_input_dims: Sequence[int | str]
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of one engine input whose ONNX dims are ints or "batch" / "seq" / "past"."""
        ranges = self.ranges()
        per_dim = []
        for d in onnx_input_dims:
            if isinstance(d, int) and d >= 0:
                per_dim.append((d, d, d))
            elif d in ranges:
                per_dim.append(ranges[d])
            elif isinstance(d, str) and d.split("+") and all(t in ranges for t in d.split("+")):
                # attention_mask [batch, past+seq]: the sum of the terms' ranges (an upper bound for max)
                terms = [ranges[t] for t in d.split("+")]
                per_dim.append(tuple(sum(r[i] for r in terms) for i in range(3)))
            else:
                raise CompileError(f"input {input_name}: dimension {d!r} has no profile (expected batch, seq or past)")
        return tuple(tuple(r[i] for r in per_dim) for i in range(3))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "min_past": 0, "opt_past": self.opt_past}


def profiles_from_flags(max_batch: int = 1, max_seq_len: int = 4096, opt_seq_len: int | None = None) -> Profiles:
    """The profile for ``--max-batch``, ``--max-seq-len`` (prompt plus generated tokens) and ``--opt-seq-len``
    (tune for prompts of that length instead of for decode). Bad values raise CompileError naming the flag."""
    max_batch = _flag_int("--max-batch", max_batch)
    max_seq_len = _flag_int("--max-seq-len", max_seq_len)
    opt_seq = 1
    if opt_seq_len is not None:
        opt_seq = _flag_int("--opt-seq-len", opt_seq_len)
        if opt_seq > max_seq_len:
            raise CompileError(f"--opt-seq-len {opt_seq} is larger than --max-seq-len {max_seq_len}")
    return Profiles(1, max_batch, max_batch, 1, opt_seq, max_seq_len, max_seq_len - 1)


# -- the ONNX flavour ------------------------------------------------------------------------------
def _declared(initializers: Sequence[Initializer]) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(i.name, ONNX_DTYPES[i.dtype], i.shape) for i in initializers]


def _small_constants(initializers: Sequence[Initializer]) -> dict[str, Any]:
    import torch

    out = {}
    for i in initializers:
        if i.dtype in (torch.int64, torch.int32, torch.float32) and i.nbytes <= _SMALL_CONSTANT_BYTES:
            out[i.name] = i.load().numpy()
    return out


def tensorrt_onnx(graph: Graph, *, producer_version: str = "0") -> tuple[onnx.ModelProto, list[Initializer]]:
    """The ONNX model (without initializers) and initializers that TensorRT's parser takes for ``graph``.

    It is ``lower_to_onnx`` with fused experts as gathers and, when no Q/DQ is blocked, opset 20; the result
    is checked against backends/tensorrt_ops.py and a model outside the list raises CompileError."""
    model, initializers = lower_to_onnx(graph, producer_version=producer_version, moe_lowering="gather")
    blocked = any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear") and any(a.name == "block_size" for a in n.attribute)
        for n in model.graph.node
    )
    if not blocked:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = min(opset.version, _OPSET_WITHOUT_BLOCKS)
    problems = check_model_supported(model, declared=_declared(initializers), constants=_small_constants(initializers))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CompileError(f"the model needs ONNX that TensorRT cannot parse: {problems[0]}{more}")
    return model, initializers


# -- the build -------------------------------------------------------------------------------------
def _parser_error(err) -> str:
    """One line per ONNX parser error: the node (index, name, op) when the parser names one, then the text."""
    where = []
    try:
        if err.node() >= 0:
            where.append(f"node {err.node()}")
        if err.node_name():
            where.append(f"'{err.node_name()}'")
        if err.node_operator():
            where.append(f"({err.node_operator()})")
    except AttributeError:  # parsers before 10.x only know the node index
        pass
    text = " ".join(str(err.desc()).split())
    return f"{' '.join(where)}: {text}" if where else text


def _input_dims(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in model.graph.input
    }


def _set_precision(trt, config, network, precision: str, has_fp8: bool, keep_fp32: tuple[str, ...]) -> None:
    """Precision flags on a weakly typed network. fp32 turns TF32 off (TensorRT enables it by default and it
    rounds MatMul inputs to 10-bit mantissas). fp16/bf16 let TensorRT pick reduced-precision kernels except in
    the MoE routers, pinned to fp32: a rounded router score can flip a top-k choice, a discrete change."""
    flags = trt.BuilderFlag
    if precision == "fp32":
        if hasattr(flags, "TF32"):
            config.clear_flag(flags.TF32)
    else:
        flag = getattr(flags, precision.upper(), None)
        if flag is None:  # TensorRT 11 removed weak typing and these flags with it
            raise CompileError(
                f"TensorRT {trt.__version__} builds strongly typed networks only; precision {precision} needs "
                "TensorRT 10.x (or build fp32)"
            )
        config.set_flag(flag)
        pinned = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if not layer.name.startswith(keep_fp32):
                continue
            outs = [layer.get_output(j) for j in range(layer.num_outputs)]
            if all(o.dtype == trt.float32 for o in outs):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1
        if pinned:
            config.set_flag(flags.PREFER_PRECISION_CONSTRAINTS)
            log.info(f"      {pinned} router layers kept in fp32")
    if has_fp8 and hasattr(flags, "FP8"):
        config.set_flag(flags.FP8)


def _load_timing_cache(config, path: Path | None):
    if path is None:
        return None
    data = b""
    if path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.info(f"      timing cache {path} was made on another device or version; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    elif data:
        log.info(f"      timing cache: {len(data):,} bytes from {path}")
    return cache


def build_engine(
    graph: Graph,
    plan_path: Path,
    *,
    profiles: Profiles,
    precision: str = "fp32",
    workspace_bytes: int = 4 << 30,
    timing_cache: Path | None = None,
) -> Path:
    """Build a TensorRT plan for ``graph`` at ``plan_path`` plus ``<stem>.manifest.json``; returns plan_path.

    precision: "fp32" (TF32 off), "fp16" or "bf16" (TensorRT picks per layer; routers stay fp32). FP8 weights
    (DequantizeLinear from FP8) are explicit quantization and are honoured in every precision.
    workspace_bytes: TensorRT's WORKSPACE memory pool limit (``--workspace``).
    timing_cache: loaded when the file exists, written after the build (``--timing-cache``).
    The manifest (dsc.engine_format.finish_engine) comes from the graph and its metadata, like every engine's,
    and the checkpoint's tokenizer is copied beside the plan.

    The manifest has the ONNX engine's fields plus ``tensorrt``: version, precision, profiles, the
    per-input profile shapes, workspace_bytes, the ONNX opset and the support list it was checked against.
    """
    from dsc.backends.tensorrt_support import require_tensorrt

    require_tensorrt()
    import tensorrt as trt
    from dsc import __version__
    from dsc.backends.onnx_io import save_model
    from dsc.engine_format import finish_engine
    from dsc.files import atomic_output, atomic_write_bytes, check_writable_dir

    if precision not in PRECISIONS:
        raise CompileError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes <= 0:
        raise CompileError(f"--workspace must be a positive number of bytes, not {workspace_bytes!r}")
    plan_path = Path(plan_path)
    check_writable_dir(plan_path)
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        check_writable_dir(timing_cache)

    model, initializers = tensorrt_onnx(graph, producer_version=__version__)
    has_fp8 = any(str(i.dtype).startswith("torch.float8") for i in initializers)
    dims = _input_dims(model)
    keep_fp32 = tuple(f"{n.name}/" for n in graph.nodes if n.op == Op.MOE_ROUTE)
    logger = trt.Logger(trt.Logger.WARNING)
    # Beside the plan, not in /tmp: the ONNX copy holds every weight and /tmp is often a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=f".{plan_path.name}.onnx-", dir=plan_path.parent) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        save_model(model, initializers, onnx_path, external_data=True)
        mb = sum(i.nbytes for i in initializers) / 2**20
        log.info(f"      parsing with TensorRT {trt.__version__} ({mb:.1f} MB)")
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or ["no error given"]
            for line in errors:
                log.info(f"      parser: {line}")
            more = f" (and {len(errors) - 1} more, listed above)" if len(errors) > 1 else ""
            raise CompileError(f"TensorRT's ONNX parser refused the model: {errors[0]}{more}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        _set_precision(trt, config, network, precision, has_fp8, keep_fp32)
        profile = builder.create_optimization_profile()
        profile_shapes = {}
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            profile_shapes[name] = profiles.shapes_for(name, dims[name])
            profile.set_shape(name, *profile_shapes[name])
        config.add_optimization_profile(profile)
        _load_timing_cache(config, timing_cache)
        r = profiles.ranges()
        log.info(
            f"      building: {precision}, batch {r['batch'][0]}..{r['batch'][2]}, seq {r['seq'][0]}..{r['seq'][2]}, "
            f"past 0..{r['past'][2]}, workspace {workspace_bytes / 2**30:.1f} GiB"
        )
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise CompileError("TensorRT could not build the engine (its log above says why)")
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        log.info(f"      timing cache saved to {timing_cache}")
    with atomic_output(plan_path) as tmp_plan, open(tmp_plan, "wb") as f:
        f.write(memoryview(serialized))
    tensorrt_info = {
        "version": trt.__version__,
        "precision": precision,
        "profiles": profiles.to_dict(),
        "profile_shapes": {k: [list(s) for s in v] for k, v in profile_shapes.items()},
        "workspace_bytes": workspace_bytes,
        "onnx_opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "moe_lowering": "gather",
        "support_list": support_summary(),
    }
    finish_engine(graph, backend="tensorrt", engine=plan_path, files=[plan_path], tensorrt=tensorrt_info)
    return plan_path
