"""Write ONNX models whose weights stream from lazy sources: bounded memory, atomic, deterministic.

A ModelProto is a sequence of protobuf fields, and GraphProto's repeated ``initializer`` (field 5) is a run of
length-delimited records, so the single-file writer serializes everything but the initializers with protobuf
itself and streams each TensorProto between them, one tensor in memory at a time. Protobuf writes fields in
number order, so the pieces are placed where it would put them: the file is byte for byte what
``SerializeToString`` of the whole model would give. Past 2 GB (protobuf's limit) the weights go to
``<model>.data`` as ONNX external data instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from dsc.errors import CompileError
from dsc.files import atomic_output, check_writable_dir
from onnx import TensorProto

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # leave room for the graph itself under protobuf's 2 GiB
_PROTOBUF_LIMIT = 2**31 - 1  # bytes; protobuf refuses to parse a larger message
_ALIGN = 4096  # external tensors start on page boundaries so onnxruntime can mmap them
_INLINE_BELOW = 1024  # bytes; smaller tensors stay inside the model file (as onnx's own converter does)

# Field numbers from onnx.proto.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9

ONNX_DTYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
    torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32,
    torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL,
}


@dataclass(frozen=True)
class Initializer:
    """A weight declared up front and loaded only when the writer reaches it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    def tensor_bytes(self) -> memoryview:
        """Load the tensor and view its little-endian bytes, without a copy when it is contiguous."""
        t = self.load()
        if t.dtype != self.dtype or tuple(t.shape) != tuple(self.shape):
            raise ValueError(
                f"initializer {self.name}: got {t.dtype}{list(t.shape)}, declared {self.dtype}{list(self.shape)}"
            )
        return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def save_model(
    model: onnx.ModelProto,
    initializers: Sequence[Initializer],
    path: Path,
    *,
    external_data: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``model`` plus ``initializers`` to ``path`` (and ``path.data`` when external). Returns the files.

    ``external_data=None`` picks external data when the weights pass EXTERNAL_DATA_THRESHOLD (or the single
    file would pass protobuf's limit). ``progress(done_bytes, total_bytes)`` is called after each initializer.
    """
    path = Path(path)
    check_writable_dir(path)
    _check_declarations(model, initializers)
    data_path = path.with_name(path.name + ".data")
    total = sum(i.nbytes for i in initializers)
    if not external_data:
        parts = _SingleFile(model, initializers)  # headers only: cheap, and gives the exact file size
        too_big = parts.size > _PROTOBUF_LIMIT
        if external_data is False and too_big:
            raise CompileError(
                f"{path}: {parts.size / 2**30:.2f} GiB is over protobuf's 2 GiB limit for one .onnx file; "
                "write the weights as external data"
            )
        external_data = external_data is None and (total > EXTERNAL_DATA_THRESHOLD or too_big)
    if external_data:
        # atomic_output exits innermost first: the data file is in place before the model that names it.
        with atomic_output(path) as tmp_model, atomic_output(data_path) as tmp_data:
            _write_external(model, initializers, tmp_model, tmp_data, data_path.name, total, progress)
        return [path, data_path]
    with atomic_output(path) as tmp_model:
        parts.write(tmp_model, total, progress)
    if data_path.is_file():
        data_path.unlink()  # a stale external-data file from an earlier compile would confuse readers
    return [path]


def check_model(path: Path) -> None:
    """The ONNX checker, by path so that external data and models past 2 GB work."""
    onnx.checker.check_model(str(path), full_check=True)


def _check_declarations(model: onnx.ModelProto, initializers: Sequence[Initializer]) -> None:
    """Refuse bad declarations before any tensor is loaded or any file opened (these are bugs, not user errors)."""
    if len(model.graph.initializer):
        raise ValueError("save_model adds the initializers itself; the graph must have none")
    seen: set[str] = set()
    for init in initializers:
        if init.dtype not in ONNX_DTYPES:
            raise ValueError(f"initializer {init.name}: {init.dtype} has no ONNX type here")
        if any(d < 0 for d in init.shape):
            raise ValueError(f"initializer {init.name}: negative dimension in {list(init.shape)}")
        if init.name in seen:
            raise ValueError(f"initializer {init.name}: declared twice")
        seen.add(init.name)


class _SingleFile:
    """A self-contained .onnx laid out as model fields < 7 | graph key | graph fields < 5 | initializers |
    graph fields > 5 | model fields > 7: protobuf's own field order, with the graph's length known up front."""

    def __init__(self, model: onnx.ModelProto, initializers: Sequence[Initializer]):
        self.model_head, self.model_tail = _split_around(model, _MODEL_GRAPH)
        self.graph_head, self.graph_tail = _split_around(model.graph, _GRAPH_INITIALIZER)
        self.records = [(init, _record_prefix(init)) for init in initializers]
        graph_len = len(self.graph_head) + len(self.graph_tail) + sum(len(p) + i.nbytes for i, p in self.records)
        self.graph_key = _key(_MODEL_GRAPH, graph_len)
        self.size = len(self.model_head) + len(self.graph_key) + graph_len + len(self.model_tail)

    def write(self, path: Path, total: int, progress: Callable[[int, int], None] | None) -> None:
        done = 0
        with open(path, "wb") as f:
            f.write(self.model_head)
            f.write(self.graph_key)
            f.write(self.graph_head)
            for init, prefix in self.records:
                raw = init.tensor_bytes()
                f.write(prefix)
                f.write(raw)
                done += len(raw)
                del raw
                _release_freed_memory()
                if progress:
                    progress(done, total)
            f.write(self.graph_tail)
            f.write(self.model_tail)


def _write_external(model, initializers, tmp_model: Path, tmp_data: Path, location: str, total: int, progress) -> None:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    done = offset = 0
    with open(tmp_data, "wb") as f:
        for init in initializers:
            raw = init.tensor_bytes()
            if len(raw) < _INLINE_BELOW:  # shape constants must stay inline for shape inference
                out.graph.initializer.append(_tensor_proto(init, bytes(raw)))
            else:
                pad = (-offset) % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(raw)
                t = _tensor_proto(init, None)
                t.data_location = TensorProto.EXTERNAL
                # location is the final file's basename, never the temporary's: the model must be relocatable
                for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
                out.graph.initializer.append(t)
                offset += len(raw)
            done += len(raw)
            del raw
            _release_freed_memory()
            if progress:
                progress(done, total)
    tmp_model.write_bytes(out.SerializeToString())


def _tensor_proto(init: Initializer, raw: bytes | None) -> TensorProto:
    t = TensorProto()
    t.name = init.name
    t.data_type = ONNX_DTYPES[init.dtype]
    t.dims.extend(init.shape)
    if raw is not None:
        t.raw_data = raw
    return t


def _record_prefix(init: Initializer) -> bytes:
    """Everything of one initializer record that precedes its raw bytes: the graph's field-5 key and length,
    the TensorProto's dims, data_type and name (fields 1, 2, 8), then raw_data's key and length (field 9)."""
    header = _tensor_proto(init, None).SerializeToString() + _key(_TENSOR_RAW_DATA, init.nbytes)
    return _key(_GRAPH_INITIALIZER, len(header) + init.nbytes) + header


def _split_around(msg, number: int) -> tuple[bytes, bytes]:
    """``msg`` serialized as two pieces, its fields numbered below ``number`` and those above (that one left out)."""
    head, tail = type(msg)(), type(msg)()
    head.CopyFrom(msg)
    tail.CopyFrom(msg)
    for field, _ in msg.ListFields():
        if field.number >= number:
            head.ClearField(field.name)
        if field.number <= number:
            tail.ClearField(field.name)
    return head.SerializeToString(), tail.SerializeToString()


def _key(number: int, length: int) -> bytes:
    """A length-delimited field's key (wire type 2) and length."""
    return _varint((number << 3) | 2) + _varint(length)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc raises its mmap threshold after large frees, so tensors
    of a few tens of MB come from the heap and, freed, would stay resident; trimming keeps RSS bounded."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
