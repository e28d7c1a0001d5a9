"""Token-id prompts from flags and files: one parser and one vocabulary check for every command."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dsc.errors import DscError


def parse_ids(text: str, where: str) -> list[int]:
    """``"1,2, 3"`` -> [1, 2, 3]; DscError naming ``where`` for anything else (empty, negative, not integers)."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise DscError(f"{where}: '{text}' is not a comma-separated list of token ids") from None
    if not ids or min(ids) < 0:
        raise DscError(f"{where}: '{text}': need at least one non-negative token id")
    return ids


def check_ids(prompts: Sequence[Sequence[int]], vocab_size: int, where: str) -> None:
    """Every id must index the model's vocabulary (one clear error instead of an index failure later)."""
    for ids in prompts:
        if not ids:
            raise DscError(f"{where}: an empty prompt")
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise DscError(f"{where}: token id {bad} is outside the vocabulary (size {vocab_size})")


def read_prompt_file(path: Path, vocab_size: int | None = None, tokenizer: Path | None = None) -> list[list[int]]:
    """Lines of comma-separated token ids, or plain text lines when ``tokenizer`` (a tokenizer.json) is given."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DscError(f"{path}: cannot read prompts: {exc}") from exc
    if not lines:
        raise DscError(f"{path}: no prompts")
    try:
        prompts = [parse_ids(ln, str(path)) for ln in lines]
    except DscError as exc:
        if tokenizer is None:
            raise DscError(f"{exc}; text prompts need the checkpoint's tokenizer.json, and it has none") from None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
        prompts = [tok.encode(ln).ids for ln in lines]
    if vocab_size is not None:
        check_ids(prompts, vocab_size, str(path))
    return prompts
