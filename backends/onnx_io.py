"""Write ONNX models whose weights stream from lazy sources: bounded memory, atomic, deterministic.

A ModelProto is a sequence of protobuf fields, and GraphProto's repeated ``initializer`` (field 5) may be
split across the message, so the writer serializes the graph without initializers once and then appends
each TensorProto as its own field-5 record, one tensor in memory at a time. Past 2 GB (protobuf's limit)
the weights go to ``<model>.data`` as ONNX external data instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from dsc.backends.atomic import check_writable_dir
from onnx import TensorProto

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # leave room for the graph itself under protobuf's 2 GiB
_ALIGN = 4096
_INLINE_BELOW = 1024  # bytes; smaller tensors stay inside the model file (as onnx's own converter does)

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
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n

    def tensor_bytes(self) -> memoryview:
        """The tensor's little-endian bytes, viewed without a copy."""
        t = self.load()
        if t.dtype != self.dtype or tuple(t.shape) != tuple(self.shape):
            raise ValueError(
                f"initializer {self.name}: got {t.dtype}{list(t.shape)}, declared {self.dtype}{list(self.shape)}"
            )
        return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


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


def _tensor_proto(init: Initializer, raw: bytes | None) -> TensorProto:
    t = TensorProto()
    t.name = init.name
    t.data_type = ONNX_DTYPES[init.dtype]
    t.dims.extend(init.shape)
    if raw is not None:
        t.raw_data = raw
    return t


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload_len: int) -> bytes:
    return _varint((number << 3) | 2) + _varint(payload_len)


def save_model(
    model: onnx.ModelProto,
    initializers: Sequence[Initializer],
    path: Path,
    *,
    external_data: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``model`` plus ``initializers`` to ``path`` (and ``path.data`` when external). Returns the files."""
    path = Path(path)
    check_writable_dir(path)
    if len(model.graph.initializer):
        raise ValueError("save_model adds the initializers itself; the graph must have none")
    total = sum(i.nbytes for i in initializers)
    if external_data is None:
        external_data = total > EXTERNAL_DATA_THRESHOLD
    tmp_model = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data_path = path.with_name(path.name + ".data")
    tmp_data = path.with_name(f".{data_path.name}.tmp-{os.getpid()}")
    try:
        if external_data:
            _write_external(model, initializers, tmp_model, tmp_data, data_path.name, total, progress)
            os.replace(tmp_data, data_path)
            os.replace(tmp_model, path)
            return [path, data_path]
        _write_single(model, initializers, tmp_model, total, progress)
        os.replace(tmp_model, path)
        with contextlib.suppress(FileNotFoundError):
            data_path.unlink()  # a stale external-data file from an earlier compile would confuse readers
        return [path]
    except BaseException:
        for p in (tmp_model, tmp_data):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise


def _write_single(model, initializers, tmp: Path, total: int, progress) -> None:
    # Field 7 (graph) must carry its full length up front: sizes come from headers + declared byte counts.
    graph_bytes = model.graph.SerializeToString()
    records = []
    for init in initializers:
        head = _tensor_proto(init, None).SerializeToString()
        body_len = init.nbytes
        raw_field = _field(9, body_len) if body_len else b""  # TensorProto.raw_data = 9
        rec_len = len(head) + len(raw_field) + body_len
        records.append((init, head, raw_field, rec_len))
    graph_len = len(graph_bytes) + sum(len(_field(5, r[3])) + r[3] for r in records)
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    done = 0
    with open(tmp, "wb") as f:
        f.write(rest.SerializeToString())
        f.write(_field(7, graph_len))
        f.write(graph_bytes)
        for init, head, raw_field, rec_len in records:
            raw = init.tensor_bytes()
            f.write(_field(5, rec_len))
            f.write(head)
            f.write(raw_field)
            f.write(raw)
            done += len(raw)
            del raw
            _release_freed_memory()
            if progress:
                progress(done, total)


def _write_external(model, initializers, tmp_model: Path, tmp_data: Path, location: str, total: int, progress) -> None:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    done = offset = 0
    with open(tmp_data, "wb") as f:
        for init in initializers:
            raw = init.tensor_bytes()
            if len(raw) < _INLINE_BELOW:  # shape constants must stay inline for shape inference
                out.graph.initializer.append(_tensor_proto(init, bytes(raw)))
                done += len(raw)
                continue
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            t = _tensor_proto(init, None)
            t.data_location = TensorProto.EXTERNAL
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


def check_model(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)
