"""Tensor types of the IR: element dtypes and shapes with symbolic dimensions.

A dimension is an int (static) or a string (symbolic): a plain name such as ``"batch"``, ``"seq"``,
``"past"``, or a sum of names and ints written ``"past+seq"``. Sums are kept canonical (terms sorted,
constants folded) so two values built along different paths compare equal.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

Dim = int | str


class DType(enum.Enum):
    F32 = "float32"
    F16 = "float16"
    BF16 = "bfloat16"
    F8E4M3 = "float8_e4m3fn"
    I8 = "int8"  # block-quantized weight values (int8 or int4 levels, the node's ``bits`` attribute says)
    I64 = "int64"
    I32 = "int32"
    BOOL = "bool"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch).element_size()

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F16, DType.BF16, DType.F8E4M3)

    @property
    def short(self) -> str:
        return _SHORT[self]

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> DType:
        for member in cls:
            if member.torch == dtype:
                return member
        raise ValueError(f"no IR dtype for torch dtype {dtype}")


_SHORT = {
    DType.F32: "f32",
    DType.F16: "f16",
    DType.BF16: "bf16",
    DType.F8E4M3: "f8e4m3",
    DType.I8: "i8",
    DType.I64: "i64",
    DType.I32: "i32",
    DType.BOOL: "bool",
}


def _terms(dim: Dim) -> tuple[list[str], int]:
    if isinstance(dim, int):
        return [], dim
    names, const = [], 0
    for term in dim.split("+"):
        if term.lstrip("-").isdigit():
            const += int(term)
        else:
            names.append(term)
    return names, const


def dim_add(*dims: Dim) -> Dim:
    """The canonical sum of dimensions: ``dim_add("seq", "past") == "past+seq"``."""
    names: list[str] = []
    const = 0
    for dim in dims:
        n, c = _terms(dim)
        names += n
        const += c
    if not names:
        return const
    parts = sorted(names) + ([str(const)] if const else [])
    return "+".join(parts)


@dataclass(frozen=True, slots=True)
class TensorType:
    dtype: DType
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self) -> int | None:
        """Element count when every dimension is static, else None."""
        n = 1
        for d in self.shape:
            if not isinstance(d, int):
                return None
            n *= d
        return n

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> TensorType:
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype.short}[{','.join(str(d) for d in self.shape)}]"


def bind_dims(shape: tuple[Dim, ...], actual: tuple[int, ...], env: dict[str, int]) -> str | None:
    """Bind symbolic names of ``shape`` against a concrete shape, extending ``env``.

    Returns None on success, else a sentence saying which dimension disagrees.
    """
    if len(shape) != len(actual):
        return f"rank {len(actual)}, expected {len(shape)}"
    for i, (want, got) in enumerate(zip(shape, actual, strict=True)):
        names, const = _terms(want)
        if not names:
            if const != got:
                return f"dim {i} is {got}, expected {const}"
        elif len(names) == 1 and names[0] not in env:
            env[names[0]] = got - const
        else:
            unknown = [n for n in names if n not in env]
            if unknown:
                continue  # a sum with unknown terms cannot be checked yet
            if sum(env[n] for n in names) + const != got:
                return f"dim {i} is {got}, expected {want}={sum(env[n] for n in names) + const}"
    return None


class Op(enum.Enum):
    EMBEDDING = "embedding"  # (ids, table) -> table[ids]
    LINEAR = "linear"  # (x, weight[out,in], scales?) -> x @ weight^T; FP8 or int (bits, block) weights take scales
    HEAD_LINEAR = "head_linear"  # (x[..., heads, in], weight[heads, out, in]) -> one linear map per head
    RMS_NORM = "rms_norm"  # (x, weight) eps
    ROPE = "rope"  # (x[..., d], positions[b, s]) inv_freq, scaling, interleaved
    # (q[b,s,H,dq], k[b,Hk,T,dk], v[b,Hk,T,dv], mask[b,T]) causal + padding mask, scale; joint_kv: keys = values
    # = cat(k, v) (MLA's latent split in halves, ir/graph.py cache_layout)
    ATTENTION = "attention"
    # DeepSeek-V3.2 DSA (DESIGN.md §9): the lightning indexer's selection, and attention over the selected keys only
    # (q[b,s,Hi,d], k[b,1,T,d] head-major, w[b,s,Hi], mask[b,T]) top_k, scale, weight_scale -> idx[b,s,min(k,T)];
    # padded keys (mask 0) are never selected
    INDEX_TOPK = "index_topk"
    SPARSE_ATTENTION = "sparse_attention"  # (q, k, v, mask as attention, idx[b,s,K]) causal, scale: keys idx only
    LAYER_NORM = "layer_norm"  # (x, weight, bias) eps
    ADD = "add"
    MUL = "mul"
    SILU = "silu"
    SPLIT = "split"  # axis, sizes -> len(sizes) outputs
    CONCAT = "concat"  # axis
    RESHAPE = "reshape"  # shape: ints, 0 copies the input dim at that index
    EXPAND = "expand"  # axis, size: broadcast a size-1 axis
    TRANSPOSE = "transpose"  # perm
    # (past[b,h,P,d], new[b,h,S,d], mask[b,T]) -> present[b,h,T,d]: past, zeros for T-P-S slots, new (genai's
    # un-run sampled token, ir/graph.py); attention hides a slot whose key starts with EMPTY_SLOT_COLUMNS zeros
    CACHE_APPEND = "cache_append"
    PAD = "pad"  # after: zero columns appended to the last axis
    MOE_ROUTE = "moe_route"  # (x, gate[E,H], bias[E]?) -> (weights[b,s,k], experts[b,s,k])
    MOE_COMBINE = "moe_combine"  # (weights, experts, y_0 ... y_{E-1}) -> sum_k weights * y_experts
    MOE_EXPERTS = (
        "moe_experts"  # (x, weights, experts, gate[E,I,H], up[E,I,H], down[E,H,I], scales x3?) -> routed SwiGLU FFNs
    )
