"""The engine format: one typed manifest beside every engine dsc writes, with one writer and one reader.

Every backend (ONNX file, TensorRT plan, expert-parallel directory) ends its ``write`` with
``finish_engine``, which builds the manifest from the graph (config, I/O, cache layout, pass records, all in
``graph.meta``), copies the checkpoint's tokenizer beside the engine, and writes both atomically. The runtime,
``dsc inspect`` and ``dsc verify`` read it back with ``read_manifest`` into the same dataclasses; nothing reads
the JSON as a raw dict.

Where the manifest lives: ``x.onnx`` / ``x.plan`` -> ``x.manifest.json`` beside it; an expert-parallel
directory -> ``DIR/ep.manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from dsc import __version__
from dsc.errors import EngineError
from dsc.files import atomic_write_bytes, sha256_files

if TYPE_CHECKING:
    from dsc.ir.graph import Graph, Value
    from dsc.placement import Placement

FORMAT = "dsc-engine"
FOLDER_ENGINE = "model.onnx"  # the engine of a model folder (``-o DIR``, backends/genai.py)
FORMAT_VERSION = 3  # 3: attention_mask input, head-major key/value caches of one shape (onnxruntime-genai)
EP_MANIFEST = "ep.manifest.json"
log = logging.getLogger("dsc")

# Both forms follow onnxruntime-genai's decoder convention (ir/graph.py cache_layout): per layer a key and a value
# of one shape, head-major [batch, heads, past, dim].
KV_LAYOUTS = {
    "naive": "per layer key and value [batch, heads, past, max(qk_head_dim, v_head_dim)]: keys and values per head, "
    "the narrower zero-padded",
    "latent": "per layer key and value [batch, 1, past, ceil(D/2)], D = kv_lora_rank + qk_rope_head_dim: the row "
    "[normalized c_kv | rotated k_pe] (one zero column when D is odd), first half as key, second half as value",
}


# DeepSeek-V3.2 (DSA): beside MLA's cache, each layer caches its lightning indexer's keys under this role
INDEXER_LAYOUT = "plus per layer indexer_key [batch, 1, past, index_head_dim]: the indexer's LayerNorm-ed, rotated keys"


def _kv_layout(form: str, cache: tuple[CacheTensor, ...]) -> str:
    if any(c.role == "indexer_key" for c in cache):
        return f"{KV_LAYOUTS[form]}; {INDEXER_LAYOUT}"
    return KV_LAYOUTS[form]


@dataclass(frozen=True)
class TensorSpec:
    """An engine input or output: name, dtype name and shape (symbolic dims as strings)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def of(cls, v: Value) -> TensorSpec:
        return cls(v.name, v.type.dtype.value, tuple(v.type.shape))


@dataclass(frozen=True)
class CacheTensor:
    """One cache tensor: the input it is fed as, the output it comes back as, its layer and role."""

    input: str
    output: str
    shape: tuple[int | str, ...]
    dtype: str
    layer: int
    role: str

    def empty(self, batch: int) -> np.ndarray:
        shape = tuple(batch if d == "batch" else 0 if d == "past" else d for d in self.shape)
        return np.zeros(shape, dtype=np.dtype(self.dtype))


def full_mask(input_ids: np.ndarray, past: list, cache: tuple[CacheTensor, ...]) -> np.ndarray:
    """The all-ones attention mask of a step without padding: [batch, past length + new tokens]."""
    seen = past_length(past[0], cache[0]) if cache else 0
    return np.ones((input_ids.shape[0], seen + input_ids.shape[1]), dtype=np.int64)


def past_length(past, entry: CacheTensor) -> int:
    """Tokens held by one cache tensor (numpy array, OrtValue or torch tensor) along its sequence axis."""
    shape = past.shape() if callable(getattr(past, "shape", None)) else past.shape
    return int(shape[entry.shape.index("past")])


@dataclass(frozen=True)
class KvCache:
    form: str  # "latent" (MLA absorbed) or "naive" (per-head keys and values)
    layout: str
    bytes_per_token: int
    tensors: tuple[CacheTensor, ...]


@dataclass(frozen=True)
class PassEntry:
    name: str
    modified: bool
    stats: dict[str, Any]
    nodes_before: int
    nodes_after: int


@dataclass(frozen=True)
class WeightGroup:
    """One group of weights (attention, routed experts, lm_head...) in one storage format, as the engine holds it."""

    group: str
    format: str  # "float32", "fp8 e4m3 128x128", "int8 block 128", ...
    tensors: int
    params: int
    bytes: int


@dataclass(frozen=True)
class Segment:
    """A dense piece of an expert-parallel engine."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class MoeCut:
    """A MoE layer run across ranks between two segments: the values it reads and the one it defines."""

    layer: int
    x: str
    weights: str
    experts: str
    output: str
    top_k: int


@dataclass(frozen=True)
class ExpertParallel:
    ranks: int
    segments: tuple[Segment, ...]
    moe_layers: tuple[MoeCut, ...]
    rank_files: tuple[tuple[str, ...], ...]
    placement: Placement


@dataclass(frozen=True)
class Manifest:
    backend: str  # "onnx" or "tensorrt"
    config: dict[str, Any]  # the model's config (ModelConfig.to_dict())
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    kv_cache: KvCache
    params: int
    active_params_per_token: int
    passes: tuple[PassEntry, ...]
    files: tuple[str, ...]  # engine file(s) first, then data files; what the checksum covers
    checksum: str  # sha256 over ``files`` in order
    mtp_layers: int = 0
    skipped_tensors: int = 0
    tokenizer: str | None = None  # file name beside the engine
    tensorrt: dict[str, Any] | None = None  # plan build facts (backends/tensorrt.py)
    expert_parallel: ExpertParallel | None = None
    quantized: str | None = None  # what this compile quantized to: "int8", "int4", "fp8"; None = as stored
    weights: tuple[WeightGroup, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (kernels, prefill form)
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids from the checkpoint (None: unset)
    dsc_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def engine_file(self) -> str | None:
        return self.files[0] if self.files and self.expert_parallel is None else None

    @property
    def data_files(self) -> tuple[str, ...]:
        return self.files[1:] if self.expert_parallel is None else ()

    @property
    def cache(self) -> tuple[CacheTensor, ...]:
        return self.kv_cache.tensors

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **_plain(dataclasses.asdict(self))}

    @classmethod
    def from_json(cls, data: Any, source: Path) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EngineError(f"{source}: not a dsc engine manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise EngineError(
                f"{source}: engine format version {data.get('format_version')}, this dsc reads {FORMAT_VERSION} "
                "(recompile the engine)"
            )
        try:
            manifest = _build(cls, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None
        from dsc.errors import ConfigError
        from dsc.frontends.config import config_from_dict

        try:  # the runtime reads the model's shape from here: it must be a config dsc accepts
            config_from_dict(dict(manifest.config), f"{source}: config")
        except ConfigError as exc:
            raise EngineError(str(exc)) from None
        if not manifest.files:
            raise EngineError(f"{source}: malformed manifest (no engine files listed)")
        for name in (*manifest.files, *([manifest.tokenizer] if manifest.tokenizer else [])):
            if not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise EngineError(f"{source}: malformed manifest (file name '{name}' leaves the engine's directory)")
        return manifest


def _plain(x: Any) -> Any:
    """JSON-able form: tuples as lists, recursively (dataclasses.asdict already expanded the dataclasses)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, data: Any) -> Any:
    """Rebuild dataclass ``cls`` from its JSON form, following the field annotations."""
    from dsc.placement import Placement

    hints = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, f in hints.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(name)
            continue
        kwargs[name] = _field(str(f.type), data[name], Placement)
    return cls(**kwargs)


_NESTED = {
    "TensorSpec": TensorSpec,
    "CacheTensor": CacheTensor,
    "KvCache": KvCache,
    "PassEntry": PassEntry,
    "WeightGroup": WeightGroup,
    "Segment": Segment,
    "MoeCut": MoeCut,
    "ExpertParallel": ExpertParallel,
}


_PLAIN = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _field(annotation: str, value: Any, placement_cls: type) -> Any:
    """``value`` as the annotated type; TypeError (a malformed manifest) when the JSON has another kind."""
    alternatives = annotation.split(" | ")
    if value is None:
        if "None" not in alternatives and annotation != "Any":
            raise TypeError(f"null where {annotation} belongs")
        return None
    head = alternatives[0]
    if head == "Placement":
        return placement_cls.from_json(value)
    if head in _NESTED:
        if not isinstance(value, dict):
            raise TypeError(f"{head} must be an object, got {json.dumps(value)[:60]}")
        return _build(_NESTED[head], value)
    if head.startswith("tuple["):
        if not isinstance(value, list):
            raise TypeError(f"expected a list for {head}, got {json.dumps(value)[:60]}")
        inner = head[len("tuple[") : -1].split(", ")[0]
        return tuple(_field(inner, v, placement_cls) for v in value)
    if head.startswith("dict[") and not isinstance(value, dict):
        raise TypeError(f"expected an object for {head}, got {json.dumps(value)[:60]}")
    if all(a in _PLAIN or a == "None" for a in alternatives):
        kinds = tuple(k for a in alternatives if a != "None" for k in _PLAIN[a])
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise TypeError(f"expected {annotation}, got {json.dumps(value)[:60]}")
    return value


# -- where manifests live ------------------------------------------------------------------------------------
def folder_engine(path: Path) -> Path:
    """A model folder (``-o DIR``) stands for its ``model.onnx``; any other path for itself."""
    path = Path(path)
    if path.is_dir() and not (path / EP_MANIFEST).is_file() and (path / FOLDER_ENGINE).is_file():
        return path / FOLDER_ENGINE
    return path


def manifest_path(engine: Path) -> Path:
    """``x.onnx`` -> ``x.manifest.json``; an expert-parallel directory -> ``DIR/ep.manifest.json``."""
    engine = Path(engine)
    if engine.is_dir() or not engine.suffix:
        return engine / EP_MANIFEST
    return engine.with_name(engine.stem + ".manifest.json")


def read_manifest(engine: Path) -> Manifest:
    """The manifest of an engine file, model folder or expert-parallel directory."""
    engine = folder_engine(Path(engine))
    path = manifest_path(engine)
    if not engine.exists():
        raise EngineError(f"{engine}: engine not found")
    if not path.is_file():
        what = "ep.manifest.json" if engine.is_dir() else "manifest"
        raise EngineError(f"{path}: {what} not found beside the engine (dsc compile writes it)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path}: unreadable manifest: {exc}") from exc
    return Manifest.from_json(data, path)


# Engines up to this size are hashed at every load (0.98 s for the bench preset's 432 MB engine on 2 busy
# cores); past it, hashing would cost more than loading (minutes for a DeepSeek-V3-sized engine), so loads only
# check that the files exist and ``dsc inspect --check`` hashes them.
CHECKSUM_AT_LOAD_BYTES = 2 << 30


def check_files(manifest: Manifest, engine: Path, *, full: bool | None = None) -> None:
    """The engine's files exist and (``full``, default: when they total at most CHECKSUM_AT_LOAD_BYTES) hash to
    the manifest's checksum: a flipped byte in a weight would otherwise run and print garbage."""
    engine = folder_engine(Path(engine))
    root = engine if manifest.expert_parallel is not None else engine.parent
    files = [root / f for f in manifest.files]
    for f in files:
        if not f.is_file():
            raise EngineError(f"{f}: engine file named by the manifest is missing")
    if full is None:
        full = sum(f.stat().st_size for f in files) <= CHECKSUM_AT_LOAD_BYTES
    if not full:
        return
    try:
        digest = sha256_files(files)
    except OSError as exc:
        raise EngineError(f"{engine}: cannot read the engine: {exc.strerror or exc}") from exc
    if digest != manifest.checksum:
        raise EngineError(f"{engine}: checksum mismatch: the engine files changed since dsc compile wrote them")


def tokenizer_config_path(tokenizer: Path) -> Path:
    """The tokenizer_config.json copied beside an engine's tokenizer: ``x.tokenizer.json`` ->
    ``x.tokenizer_config.json``, a model folder's ``tokenizer.json`` -> ``tokenizer_config.json``."""
    return tokenizer.with_name(tokenizer.name[: -len("tokenizer.json")] + "tokenizer_config.json")


def write_manifest(manifest: Manifest, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n").encode())


# -- building a manifest from the compiled graph -------------------------------------------------------------
def manifest_from_graph(graph: Graph, *, backend: str, files: list[Path], **fields: Any) -> Manifest:
    """The manifest of ``graph`` compiled into ``files``: everything comes from the graph and its metadata."""
    from dsc.ir.analysis import active_params, kv_bytes_per_token, weight_groups

    cfg = graph.meta["model_config"]
    values = {v.name: v for v in [*graph.inputs, *graph.outputs]}
    form = graph.meta.get("kv_cache_form", "naive")
    cache = tuple(
        CacheTensor(
            c.past, c.present, tuple(values[c.past].type.shape), values[c.past].type.dtype.value, c.layer, c.role
        )
        for c in graph.cache_entries()
    )
    groups = weight_groups(graph)
    return Manifest(
        backend=backend,
        config=cfg.to_dict(),
        inputs=tuple(TensorSpec.of(v) for v in graph.inputs),
        outputs=tuple(TensorSpec.of(v) for v in graph.outputs),
        kv_cache=KvCache(form, _kv_layout(form, cache), kv_bytes_per_token(graph), cache),
        params=sum(g["params"] for g in groups),  # model parameters: block scales are not counted
        active_params_per_token=active_params(graph),
        passes=tuple(PassEntry(**r) for r in graph.meta.get("pass_records", ())),
        files=tuple(p.name if p.parent == files[0].parent else str(p.relative_to(files[0].parent)) for p in files),
        checksum=sha256_files(files),
        mtp_layers=cfg.num_nextn_predict_layers,
        skipped_tensors=len(graph.meta.get("skipped_keys", ())),
        quantized=_quantized(graph),
        weights=tuple(WeightGroup(**g) for g in groups),
        special_tokens=dict(graph.meta.get("special_tokens", {})),
        **fields,
    )


def _quantized(graph: Graph) -> str | None:
    """The quantization this compile applied (from the passes' records), None when weights are as stored."""
    ran = {r["name"] for r in graph.meta.get("pass_records", ()) if r["modified"]}
    if "int-quantize" in ran:
        return f"int{graph.meta['int_quantization']['bits']}"
    if "fp8-quantize" in ran:
        return "fp8"
    return None


def finish_engine(graph: Graph, *, backend: str, engine: Path, files: list[Path], **fields: Any) -> Manifest:
    """Copy the checkpoint's tokenizer beside the engine and write the manifest. On any failure every file of
    the engine is removed: an engine never stays without its manifest."""
    written = list(files)
    try:
        tokenizer = graph.meta.get("tokenizer_path")
        if tokenizer is not None and "tokenizer" not in fields:
            tok = (engine / "tokenizer.json") if engine.is_dir() else engine.with_name(engine.stem + ".tokenizer.json")
            atomic_write_bytes(tok, Path(tokenizer).read_bytes())
            written.append(tok)
            fields["tokenizer"] = tok.name
            tok_config = Path(tokenizer).with_name("tokenizer_config.json")  # the chat template, when there is one
            if tok_config.is_file():
                written.append(tokenizer_config_path(tok))
                atomic_write_bytes(written[-1], tok_config.read_bytes())
        manifest = manifest_from_graph(graph, backend=backend, files=files, **fields)
        write_manifest(manifest, manifest_path(engine))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return manifest
