"""Lazy access to the tensors of a safetensors checkpoint (single file, directory, or sharded index).

Opening reads only headers, and validates them (JSON, dtypes, offsets against shapes and the file size),
so truncated or corrupt files fail at open time with the file named. Each ``load`` opens the file with
safetensors' own mmap reader, copies the one tensor out and closes the mapping again, so the pages of a
checkpoint being streamed into an engine do not stay resident: memory is bounded by the largest tensor.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from dsc.errors import CheckpointError, ConfigError
from dsc.frontends.config import ModelConfig, load_config
from safetensors import safe_open

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, not even a safetensors header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: corrupt: header length {n} exceeds the file's {size} bytes")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError):
        raise CheckpointError(f"{path}: corrupt: the safetensors header is not valid JSON") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt: bad header entry for tensor '{key}'") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * torch.empty((), dtype=dtype).element_size() or start < 0:
            raise CheckpointError(
                f"{path}: corrupt: tensor '{key}' offsets [{start}, {end}) do not fit its {entry['dtype']}{list(shape)}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor '{key}' ends at byte {end} of the data section, "
                f"but the file holds only {data_size} bytes of data"
            )
        infos[key] = TensorInfo(key, dtype, shape, path)
    return infos


class Checkpoint:
    """A checkpoint's config and lazily loaded tensors."""

    def __init__(
        self,
        root: Path,
        config: ModelConfig,
        tensors: dict[str, TensorInfo],
        files: list[Path],
        skipped_keys: list[str],
    ) -> None:
        self.root = root
        self.config = config
        self.files = files
        self.skipped_keys = skipped_keys
        self._tensors = tensors
        tok = root / "tokenizer.json"
        self.tokenizer_path: Path | None = tok if tok.is_file() else None

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        if path.is_dir():
            root = path
            index = path / "model.safetensors.index.json"
            single = path / "model.safetensors"
            if index.is_file():
                files, index_map = _read_index(index)
            elif single.is_file():
                files, index_map = [single], None
            else:
                found = sorted(path.glob("*.safetensors"))
                if not found:
                    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json inside")
                files, index_map = found, None
        elif path.name.endswith(".index.json"):
            root = path.parent
            files, index_map = _read_index(path)
        elif path.suffix == ".safetensors":
            root = path.parent
            files, index_map = [path], None
        else:
            raise CheckpointError(f"{path}: expected a .safetensors file, a model directory or an .index.json")
        config = load_config(root / "config.json")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for key, info in read_header(f).items():
                if key in tensors:
                    raise CheckpointError(f"{f}: tensor '{key}' also appears in {tensors[key].file.name}")
                tensors[key] = info
        if index_map is not None:
            for key, fname in index_map.items():
                if key not in tensors or tensors[key].file.name != fname:
                    raise CheckpointError(f"{root / fname}: tensor '{key}' listed in the index is not in this shard")
        skipped = sorted(k for k in tensors if (m := _LAYER.match(k)) and int(m.group(1)) >= config.num_hidden_layers)
        for k in skipped:
            del tensors[k]
        return cls(root, config, tensors, files, skipped)

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def has(self, key: str) -> bool:
        return key in self._tensors

    def info(self, key: str) -> TensorInfo:
        if key not in self._tensors:
            where = self.files[0] if len(self.files) == 1 else self.root
            raise CheckpointError(f"{where}: tensor '{key}' is missing (the model's config.json needs it)")
        return self._tensors[key]

    def expect(self, key: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.info(key)
        if info.shape != tuple(shape):
            raise CheckpointError(
                f"{info.file}: tensor '{key}' has shape {list(info.shape)}, expected {list(shape)} from config.json"
            )
        if self.is_fp8(key):
            scale = self.info(key + "_scale_inv")
            bo, bi = self.fp8_block_size or (128, 128)
            want = (-(-shape[0] // bo), -(-shape[1] // bi))
            if scale.shape != want:
                raise CheckpointError(
                    f"{scale.file}: tensor '{scale.key}' has shape {list(scale.shape)}, expected "
                    f"{list(want)} block scales for {list(shape)}"
                )
        return info

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        q = self.config.quantization
        return tuple(q.weight_block_size) if q is not None else None

    def is_fp8(self, key: str) -> bool:
        return self.info(key).dtype == torch.float8_e4m3fn

    def load(self, key: str) -> torch.Tensor:
        info = self.info(key)
        try:
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(key).clone()
        except Exception as exc:  # safetensors raises SafetensorError and friends
            raise CheckpointError(f"{info.file}: cannot read tensor '{key}': {exc}") from exc

    def load_float(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor in ``dtype``; FP8 weights are dequantized with their 128x128 block scales (DESIGN.md §5)."""
        t = self.load(key)
        if t.dtype != torch.float8_e4m3fn:
            return t.to(dtype)
        scale = self.load(key + "_scale_inv").to(torch.float32)
        bo, bi = self.fp8_block_size or (128, 128)
        rows, cols = t.shape
        expanded = scale.repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
        return (t.to(torch.float32) * expanded).to(dtype)


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object)") from None
    files = []
    for name in sorted(set(weight_map.values())):
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index}: shard '{name}' is missing")
        files.append(shard)
    return files, weight_map


__all__ = ["Checkpoint", "TensorInfo", "read_header", "CheckpointError", "ConfigError"]
