"""Lazy access to the tensors of a safetensors checkpoint (single file, directory, or sharded index).

Opening reads only headers, and validates them as safetensors itself does (JSON, known dtypes, offsets that
match the shapes and tile the data section back to back, within the file), so a truncated or corrupt file
fails at open time with the file named. ``load`` reads one tensor with plain ``readinto`` into a fresh
tensor: no mapping outlives the call, so streaming a checkpoint into an engine keeps memory bounded by the
largest tensor. (Measured on a 400 MB tensor: safetensors' ``safe_open`` + ``clone`` peaks at twice the
tensor, because the mapped pages are resident while they are copied; ``readinto`` peaks at once the tensor,
at the same speed. Both leave nothing resident afterwards.)
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dsc.errors import CheckpointError
from dsc.frontends.config import ModelConfig, defaults_used, load_config

# safetensors dtype names; all little-endian on disk, as torch stores them on the hosts we run on
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
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn)
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_DEFAULT_FP8_BLOCK = (128, 128)  # DeepSeek's, when config.json has no quantization_config (DESIGN.md §5)


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path


@dataclass(frozen=True)
class _Location:
    start: int  # absolute byte offset in the file
    nbytes: int
    file_size: int  # at open time, to notice a file rewritten underneath us


def _parse_header(path: Path) -> dict[str, tuple[TensorInfo, _Location]]:
    """Parse and validate one safetensors file's header; raise CheckpointError naming ``path``."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8 or n > _MAX_HEADER:
                raise CheckpointError(
                    f"{path}: corrupt or truncated: the header length field says {n} bytes "
                    f"but the file has {size} bytes"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, tuple[TensorInfo, _Location]] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        try:
            dtype_name, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, start, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(
                f"{path}: corrupt: header entry for tensor '{key}' is malformed: {json.dumps(entry)[:200]}"
            )
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{path}: unsupported dtype '{dtype_name}' for tensor '{key}'")
        dtype = _DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes:
            raise CheckpointError(
                f"{path}: corrupt: tensor '{key}' is {dtype_name}{list(shape)} ({nbytes} bytes) but its "
                f"data_offsets [{start}, {end}] span {end - start} bytes"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: header says tensor '{key}' ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
        spans.append((start, end, key))
        out[key] = (TensorInfo(key, dtype, tuple(shape), path), _Location(data_start + start, nbytes, size))
    # safetensors requires the tensors to tile the data section exactly; check it here so that whatever we
    # accept, other readers (transformers) accept too
    pos = 0
    for start, end, key in sorted(spans):
        if start != pos:
            what = "overlaps the tensor before it" if start < pos else f"leaves a gap of {start - pos} bytes"
            raise CheckpointError(f"{path}: corrupt: tensor '{key}' {what} in the data section")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{path}: corrupt: {data_size - pos} bytes after the last tensor's data")
    return out


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """The validated tensor table of one safetensors file (no tensor data is read)."""
    return {key: info for key, (info, _) in _parse_header(Path(path)).items()}


class Checkpoint:
    """A checkpoint's config and its lazily loaded tensors."""

    def __init__(
        self,
        root: Path,
        config: ModelConfig,
        tensors: dict[str, tuple[TensorInfo, _Location]],
        files: list[Path],
        skipped_keys: list[str],
    ) -> None:
        self.root = root
        self.config = config
        self.files = files
        self.skipped_keys = skipped_keys  # MTP layers (index >= num_hidden_layers), not compiled
        self._tensors = tensors
        self.defaulted: dict[str, object] = {}  # config.json fields left out, filled with transformers' defaults
        tok = root / "tokenizer.json"
        self.tokenizer_path: Path | None = tok if tok.is_file() else None

    def special_tokens(self) -> dict[str, int | None]:
        """bos / eos / pad token ids: generation_config.json first, then config.json (transformers' order); None
        where neither says (a list of eos ids keeps its first)."""
        found: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        for name in ("config.json", "generation_config.json"):
            try:
                data = json.loads((self.root / name).read_text())
            except (OSError, ValueError):
                continue
            for key in found:
                value = data.get(key) if isinstance(data, dict) else None
                value = value[0] if isinstance(value, list) and value else value
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.config.vocab_size:
                    found[key] = value
        return found

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """``path``: a .safetensors file, a model.safetensors.index.json, or a directory holding either
        (model.safetensors first, as transformers does); config.json sits beside the weights."""
        path = Path(path)
        index: Path | None = None
        if not path.exists():
            raise CheckpointError(f"{path}: does not exist")
        if path.is_dir():
            root = path
            if (path / "model.safetensors").is_file():
                files = [path / "model.safetensors"]
            elif (path / "model.safetensors.index.json").is_file():
                index = path / "model.safetensors.index.json"
            else:
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json inside")
        elif path.name.endswith(".index.json"):
            root, index = path.parent, path
        elif path.suffix == ".safetensors":
            root, files = path.parent, [path]
        else:
            raise CheckpointError(f"{path}: expected a .safetensors file, a model directory or an .index.json")
        weight_map = None
        if index is not None:
            files, weight_map = _read_index(index)
        config = load_config(root / "config.json")

        tensors: dict[str, tuple[TensorInfo, _Location]] = {}
        for f in files:
            for key, entry in _parse_header(f).items():
                if key in tensors:
                    raise CheckpointError(f"{f}: tensor '{key}' also appears in {tensors[key][0].file}")
                tensors[key] = entry
        for key, name in (weight_map or {}).items():
            if key not in tensors or tensors[key][0].file != index.parent / name:
                raise CheckpointError(f"{index}: tensor '{key}' is listed in shard '{name}' but that file lacks it")
        skipped = sorted(k for k in tensors if (m := _LAYER.match(k)) and int(m.group(1)) >= config.num_hidden_layers)
        for k in skipped:
            del tensors[k]
        ckpt = cls(root, config, tensors, files, skipped)
        try:
            ckpt.defaulted = defaults_used(json.loads((root / "config.json").read_bytes()))
        except (OSError, ValueError):
            pass  # load_config read it a moment ago; only the hint is lost
        return ckpt

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def has(self, key: str) -> bool:
        return key in self._tensors

    def info(self, key: str) -> TensorInfo:
        if key not in self._tensors:
            raise CheckpointError(f"{self.root}: tensor '{key}' is missing (expected by the model's config)")
        return self._tensors[key][0]

    def expect(self, key: str, shape: tuple[int, ...]) -> TensorInfo:
        """The tensor's info after checking it exists with ``shape`` (and, for FP8, that its block scales do)."""
        info = self.info(key)
        if info.shape != tuple(shape):
            defaulted = ", ".join(f"{k} (default {v})" for k, v in self.defaulted.items())
            raise CheckpointError(
                f"{info.file}: tensor '{key}' has shape {list(info.shape)}, expected {list(shape)} from config.json"
                + (f", which omits {defaulted}" if defaulted else "")
            )
        if info.dtype not in _WEIGHT_DTYPES:  # an integer tensor would be read as float and run as garbage
            raise CheckpointError(
                f"{info.file}: tensor '{key}' has dtype {_DTYPE_NAMES[info.dtype]}, expected a float weight "
                "(F32, BF16, F16, F64, or F8_E4M3 with block scales)"
            )
        if self.is_fp8(key):
            self._scale_info(key)
        return info

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        q = self.config.quantization
        return q.weight_block_size if q is not None else None

    def is_fp8(self, key: str) -> bool:
        return self.info(key).dtype == torch.float8_e4m3fn

    def load(self, key: str) -> torch.Tensor:
        """The tensor as stored (dtype and shape), in memory of its own."""
        self.info(key)  # names a missing tensor
        info, loc = self._tensors[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        if loc.nbytes == 0:
            return out
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        try:
            with open(info.file, "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != loc.file_size:
                    raise CheckpointError(f"{info.file}: changed size since the checkpoint was opened")
                f.seek(loc.start)
                done = 0
                while done < loc.nbytes:
                    got = f.readinto(buf[done:])
                    if not got:
                        raise CheckpointError(f"{info.file}: truncated while reading tensor '{key}'")
                    done += got
        except OSError as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor '{key}': {exc.strerror or exc}") from exc
        finally:
            buf.release()
        bad = count_non_finite(out)
        if bad:
            raise CheckpointError(
                f"{info.file}: tensor '{key}' has {bad} non-finite value{'s' if bad != 1 else ''} (NaN or Inf) "
                f"of {out.numel()}"
            )
        return out

    def load_float(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor in ``dtype``. FP8 weights are dequantized with their ``<key>_scale_inv`` block scales,
        partial edge blocks sharing their block's scale (DESIGN.md §5): w = q * scale, computed in float32."""
        t = self.load(key)
        if t.dtype != torch.float8_e4m3fn:
            return t.to(dtype)
        scale = self.load(self._scale_info(key).key).to(torch.float32)
        bo, bi = self.fp8_block_size or _DEFAULT_FP8_BLOCK
        w = t.to(torch.float32)
        del t
        cols = w.shape[1]
        for r, row_scales in enumerate(scale):  # one block row at a time: no full-size scale tensor
            w[r * bo : (r + 1) * bo].mul_(row_scales.repeat_interleave(bi)[:cols])
        return w.to(dtype)

    def _scale_info(self, key: str) -> TensorInfo:
        info = self.info(key)
        scale_key = key + "_scale_inv"
        if not self.has(scale_key):
            raise CheckpointError(f"{info.file}: FP8 tensor '{key}' has no block scales '{scale_key}' beside it")
        scale = self.info(scale_key)
        if scale.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise CheckpointError(
                f"{scale.file}: tensor '{scale_key}' has dtype {_DTYPE_NAMES[scale.dtype]}, expected float block scales"
            )
        bo, bi = self.fp8_block_size or _DEFAULT_FP8_BLOCK
        want = (-(-info.shape[0] // bo), -(-info.shape[1] // bi)) if len(info.shape) == 2 else None
        if scale.shape != want:
            raise CheckpointError(
                f"{scale.file}: tensor '{scale_key}' has shape {list(scale.shape)}, expected "
                f"{list(want) if want else 'a 2-D weight'} for {bo}x{bi} block scales of {list(info.shape)}"
            )
        return scale


# Bit patterns that are not finite numbers, as (mask, pattern) over the raw bits with the sign masked off:
# an all-ones exponent (Inf or NaN) in IEEE-like formats; e4m3fn has no Inf and one NaN, S.1111.111
_NON_FINITE_BITS = {
    torch.bfloat16: (np.int16, 0x7F80, 0x7F80),
    torch.float8_e4m3fn: (np.uint8, 0x7F, 0x7F),
    torch.float8_e5m2: (np.uint8, 0x7C, 0x7C),
}
_CHECK_CHUNK = 1 << 20  # elements per numpy chunk: temporaries stay at a few MB whatever the tensor size


def count_non_finite(t: torch.Tensor) -> int:
    """How many NaN/Inf values ``t`` holds (0 for integer tensors). Every checkpoint tensor passes through here
    as it is read (Checkpoint.load), so a NaN in a weight that is later quantized or packed is still caught,
    with no second pass over the checkpoint. numpy, not torch: on 2 busy cores each torch op pays ~10 ms of
    OpenMP wake-up, which made a torch version cost 3.2 s of a 10 s bench compile. Measured on the bench preset
    (113M fp32 params, 2 shared cores, 3 compiles each way): the check itself takes 0.09-0.19 s of a compile
    (under 2%); compile times with it 10.1/11.3/11.4 s, without 10.4/11.8/15.6 s (the load's noise is larger)."""
    if t.dtype in _NON_FINITE_BITS:
        int_dtype, mask, pattern = _NON_FINITE_BITS[t.dtype]
        bits = t.reshape(-1).view(torch.int16 if int_dtype is np.int16 else torch.uint8).numpy()
        return sum(
            int(np.count_nonzero((bits[i : i + _CHECK_CHUNK] & mask) == pattern))
            for i in range(0, bits.size, _CHECK_CHUNK)
        )
    if not t.is_floating_point():
        return 0
    a = t.reshape(-1).numpy()
    with np.errstate(all="ignore"):
        if np.isfinite(a.sum()):  # one reduction: finite unless a value is NaN/Inf (or the sum overflows)
            return 0
    return sum(int(np.count_nonzero(~np.isfinite(a[i : i + _CHECK_CHUNK]))) for i in range(0, a.size, _CHECK_CHUNK))


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object of file names)")
    files = []
    for name in sorted(set(weight_map.values())):
        # check the names as written, not where they resolve: a Hugging Face cache snapshot's shards are
        # symlinks into ../../blobs/, which is fine; a name that itself climbs out of the directory is not
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(
                f"{index}: shard name '{name}' leaves the checkpoint directory (need a name inside {index.parent})"
            )
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index}: shard '{name}' is missing (expected at {shard})")
        files.append(shard)
    return files, weight_map


__all__ = ["Checkpoint", "TensorInfo", "count_non_finite", "read_header"]
