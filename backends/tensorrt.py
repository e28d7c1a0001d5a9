"""IR -> TensorRT plan: the ONNX flavour TensorRT parses, optimization profiles, and the engine build.

The plan is built from the same ONNX lowering as ``.onnx`` engines (backends/onnx.py), with fused experts
lowered to standard ops (``moe_lowering="gather"``: TensorRT has no com.microsoft MoE) and checked against the
kept support list (backends/tensorrt_ops.py). Two optimization profiles: decode (seq 1) and bounded prefill chunks.

Entry points the CLI uses (``dsc compile -o model.plan``):
    profiles = profiles_from_flags(max_batch, max_seq_len, opt_seq_len, prefill_chunk)  # --max-batch --max-seq-len ...
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
from dsc.backends.tensorrt_types import (
    FP8_BLOCKS_SINCE,
    activation_bytes_estimate,
    fp8_for_tensorrt,
    initializer_dtypes,
    parse_tensorrt_version,
    retype,
)
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


DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class Profiles:
    """Two optimization profiles (DESIGN.md §8): ``decode`` (seq 1, past 0..max_seq-1) and ``prefill`` (seq
    1..prefill_chunk, past 0..max_seq-1), each with batch 1..max_batch. One profile spanning seq 1..max_seq would
    size the activations (STATIC allocation uses the profile maximum) for a max_seq-token step: [T, k, H, 2I]
    gathered expert weights with T = batch * max_seq. The runtime runs seq-1 steps on the decode profile and feeds
    longer prompts to the prefill profile in chunks of at most ``prefill_chunk`` tokens.

    ``opt_seq`` is the prefill length TensorRT tunes the prefill profile for (default: the chunk); the decode
    profile is tuned for a half-full cache.
    """

    max_batch: int
    max_seq: int
    prefill_chunk: int
    opt_seq: int

    def __post_init__(self) -> None:
        if not 1 <= self.opt_seq <= self.prefill_chunk <= self.max_seq or self.max_batch < 1:
            raise CompileError(
                f"profiles: need 1 <= opt seq <= prefill chunk <= max seq and batch >= 1, got {self.opt_seq}, "
                f"{self.prefill_chunk}, {self.max_seq}, {self.max_batch}"
            )

    @property
    def max_past(self) -> int:
        return self.max_seq - 1

    @property
    def names(self) -> tuple[str, ...]:
        """The profiles in the plan, in index order (no prefill profile when a chunk is one token)."""
        return ("decode", "prefill") if self.prefill_chunk > 1 else ("decode",)

    def ranges(self, profile: str) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each symbolic dimension of the engine's inputs in ``profile``."""
        batch = (1, self.max_batch, self.max_batch)
        if profile == "decode":
            return {"batch": batch, "seq": (1, 1, 1), "past": (0, self.max_past // 2, self.max_past)}
        return {"batch": batch, "seq": (1, self.opt_seq, self.prefill_chunk), "past": (0, 0, self.max_past)}

    def shapes_for(
        self, profile: str, input_name: str, onnx_input_dims: Sequence[int | str]
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of one engine input whose ONNX dims are ints or "batch" / "seq" / "past"."""
        ranges = self.ranges(profile)
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

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_past": self.max_past, "ranges": {p: self.ranges(p) for p in self.names}}


def profiles_from_flags(
    max_batch: int = 1,
    max_seq_len: int = 4096,
    opt_seq_len: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Profiles:
    """The profiles for ``--max-batch``, ``--max-seq-len`` (prompt plus generated tokens), ``--prefill-chunk``
    (the most prompt tokens one step takes; longer prompts run in chunks; clipped to --max-seq-len) and
    ``--opt-seq-len`` (the prefill length to tune for; default the chunk). Bad values raise CompileError naming
    the flag."""
    max_batch = _flag_int("--max-batch", max_batch)
    max_seq_len = _flag_int("--max-seq-len", max_seq_len)
    chunk = min(_flag_int("--prefill-chunk", prefill_chunk), max_seq_len)
    opt_seq = chunk
    if opt_seq_len is not None:
        opt_seq = _flag_int("--opt-seq-len", opt_seq_len)
        if opt_seq > chunk:
            raise CompileError(f"--opt-seq-len {opt_seq} is larger than the prefill chunk {chunk}")
    return Profiles(max_batch, max_seq_len, chunk, opt_seq)


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


# Nodes kept in float32 in fp16/bf16 plans: the MoE routers (a rounded score can flip a top-k choice, a discrete
# change), the RMS norms (a mean of squares) and rope (angles grow with the position; ONNX has no bf16 Cos/Sin).
FP32_OPS = (Op.MOE_ROUTE, Op.RMS_NORM, Op.ROPE)


def fp32_prefixes(graph: Graph) -> tuple[str, ...]:
    """Name prefixes of the ONNX nodes lowered from the IR nodes in ``FP32_OPS`` (backends/onnx.py names every
    node ``{ir node}/{op type}``)."""
    return tuple(f"{n.name}/" for n in graph.nodes if n.op in FP32_OPS)


def tensorrt_onnx(
    graph: Graph,
    *,
    precision: str = "fp32",
    producer_version: str = "0",
    tensorrt_version: tuple[int, int] = FP8_BLOCKS_SINCE,
) -> tuple[onnx.ModelProto, list[Initializer]]:
    """The ONNX model (without initializers) and initializers that TensorRT's parser takes for ``graph``.

    It is ``lower_to_onnx`` with fused experts as gathers and, when no Q/DQ is blocked, opset 20, computing in
    ``precision`` (backends/tensorrt_types.retype: a strongly typed network's precision is its graph's dtypes);
    FP8 weights go the way ``tensorrt_version`` takes them (backends/tensorrt_types.fp8_for_tensorrt: blocked
    DequantizeLinear from 10.13, full blocks, 2-D scales; expert stacks, and everything before 10.13, dequantized
    at compile time). The result is checked against backends/tensorrt_ops.py and a model outside the list raises
    CompileError."""
    if precision not in PRECISIONS:
        raise CompileError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    model, initializers = lower_to_onnx(graph, producer_version=producer_version, moe_lowering="gather")
    model, initializers, fp8 = fp8_for_tensorrt(model, initializers, tensorrt_version)
    if fp8["dequantized"]:
        why = (
            f"TensorRT {'.'.join(map(str, tensorrt_version))} has no FP8 block dequantization (10.13+): all"
            if tensorrt_version < FP8_BLOCKS_SINCE
            else "expert stacks (a DequantizeLinear before their Gather would dequantize every expert every step):"
        )
        log.info(
            f"      FP8: {why} {fp8['dequantized']} weights dequantized to {precision} at compile time "
            f"({fp8['dequantized_bytes'] / 2**20:.1f} MB as fp32); {fp8['kept']} stay FP8"
        )
    if fp8["padded"]:
        log.info(f"      FP8: {fp8['padded']} weights padded to whole 128-blocks (TensorRT infers the block size)")
    model, initializers, stats = retype(model, initializers, precision, fp32_prefixes(graph))
    if precision != "fp32":
        log.info(
            f"      {precision}: {stats['weights_converted']} weights converted, {stats['pinned_nodes']} nodes kept "
            f"in fp32 (routers, norms, rope), {stats['casts']} casts"
        )
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


def _checked(value, what: str, version: str):
    """A TensorRT call's result, or CompileError naming the call and the TensorRT version when it returned None
    (TensorRT reports why on its logger, above)."""
    if value is None:
        raise CompileError(f"TensorRT {version}: {what} failed (its log above says why)")
    return value


def activation_memory(trt, serialized, model, initializers, profile_shapes: dict[str, dict[str, tuple]]) -> dict:
    """Device memory for activations per profile: TensorRT's own figure from the built plan
    (``get_device_memory_size_for_profile_v2``, else the plan-wide ``device_memory_size_v2``), else dsc's estimate
    from the graph (backends/tensorrt_types.activation_bytes_estimate), which is recorded beside it either way."""
    estimate = {}
    for name, shapes in profile_shapes.items():
        estimate[name], _ = activation_bytes_estimate(model, initializers, {k: v[2] for k, v in shapes.items()})
    out: dict[str, Any] = {"source": "estimate", "bytes": dict(estimate), "estimate": estimate}
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
    if engine is None:
        return out
    if hasattr(engine, "get_device_memory_size_for_profile_v2"):
        sizes = {n: int(engine.get_device_memory_size_for_profile_v2(i)) for i, n in enumerate(profile_shapes)}
        out.update(source="tensorrt per profile", bytes=sizes)
    elif hasattr(engine, "device_memory_size_v2"):
        out.update(
            source="tensorrt, largest profile", bytes=dict.fromkeys(profile_shapes, engine.device_memory_size_v2)
        )
    return out


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

    precision: "fp32" (TF32 off), "fp16" or "bf16", written into the ONNX graph's dtypes (``tensorrt_onnx``) and
    built as a strongly typed network, the only kind TensorRT 11 builds: no precision flags, no per-layer output
    types. FP8 weights (DequantizeLinear from FP8) are explicit quantization, honoured in every precision.
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

    model, initializers = tensorrt_onnx(
        graph,
        precision=precision,
        producer_version=__version__,
        tensorrt_version=parse_tensorrt_version(trt.__version__),
    )
    dims = _input_dims(model)
    version = trt.__version__
    logger = trt.Logger(trt.Logger.WARNING)
    # Beside the plan, not in /tmp: the ONNX copy holds every weight and /tmp is often a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=f".{plan_path.name}.onnx-", dir=plan_path.parent) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        save_model(model, initializers, onnx_path, external_data=True)
        mb = sum(i.nbytes for i in initializers) / 2**20
        log.info(f"      parsing with TensorRT {trt.__version__} ({mb:.1f} MB)")
        builder = _checked(trt.Builder(logger), "creating a builder", version)
        strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = _checked(builder.create_network(strongly_typed), "creating a network", version)
        parser = _checked(trt.OnnxParser(network, logger), "creating the ONNX parser", version)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or ["no error given"]
            for line in errors:
                log.info(f"      parser: {line}")
            more = f" (and {len(errors) - 1} more, listed above)" if len(errors) > 1 else ""
            raise CompileError(f"TensorRT's ONNX parser refused the model: {errors[0]}{more}")
        config = _checked(builder.create_builder_config(), "creating a builder config", version)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        # TF32 (on by default) rounds float32 MatMul inputs to 10-bit mantissas: fp32 means fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
        profile_shapes: dict[str, dict[str, tuple]] = {}
        for index, name in enumerate(profiles.names):
            profile = _checked(builder.create_optimization_profile(), f"creating the {name} profile", version)
            profile_shapes[name] = {}
            for i in range(network.num_inputs):
                tensor = network.get_input(i).name
                profile_shapes[name][tensor] = profiles.shapes_for(name, tensor, dims[tensor])
                profile.set_shape(tensor, *profile_shapes[name][tensor])
            if config.add_optimization_profile(profile) != index:
                raise CompileError(
                    f"TensorRT {version} refused the {name} optimization profile {profiles.ranges(name)}"
                )
        _load_timing_cache(config, timing_cache)
        log.info(
            f"      building: {precision}, batch 1..{profiles.max_batch}, decode (seq 1) and prefill chunks of up to "
            f"{profiles.prefill_chunk} tokens, past 0..{profiles.max_past}, workspace {workspace_bytes / 2**30:.1f} GiB"
        )
        serialized = _checked(builder.build_serialized_network(network, config), "building the engine", version)
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        log.info(f"      timing cache saved to {timing_cache}")
    activation = activation_memory(trt, serialized, model, initializers, profile_shapes)
    for name, n in activation["bytes"].items():
        log.info(f"      {name} profile: {n / 2**20:,.1f} MiB of activation memory ({activation['source']})")
    with atomic_output(plan_path) as tmp_plan, open(tmp_plan, "wb") as f:
        f.write(memoryview(serialized))
    tensorrt_info = {
        "version": trt.__version__,
        "precision": precision,
        "profiles": profiles.to_dict(),
        "profile_shapes": {
            p: {k: [list(s) for s in v] for k, v in shapes.items()} for p, shapes in profile_shapes.items()
        },
        "activation_bytes": activation,
        "workspace_bytes": workspace_bytes,
        "onnx_opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "moe_lowering": "gather",
        "strongly_typed": True,
        "weight_bytes_by_dtype": initializer_dtypes(initializers),
        "support_list": support_summary(),
    }
    finish_engine(graph, backend="tensorrt", engine=plan_path, files=[plan_path], tensorrt=tensorrt_info)
    return plan_path
