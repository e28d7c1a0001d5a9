"""Text in and out of `dsc run --prompt`, through the tokenizer.json the compile copied beside the engine."""

from __future__ import annotations

from pathlib import Path

from dsc.engine_format import Manifest, folder_engine
from dsc.errors import EngineError


def load_tokenizer(engine_path: Path, manifest: Manifest):
    name = manifest.tokenizer
    if not name:
        raise EngineError(
            f"{engine_path}: --prompt needs a tokenizer, and none was beside the checkpoint when it was "
            "compiled (put tokenizer.json beside config.json and recompile, or use --prompt-ids)"
        )
    engine_path = folder_engine(Path(engine_path))
    path = engine_path / name if engine_path.is_dir() else engine_path.with_name(name)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise EngineError("--prompt needs the 'tokenizers' package: pip install tokenizers") from None
    try:
        return _Wrapped(Tokenizer.from_file(str(path)))
    except Exception as exc:  # tokenizers raises plain Exceptions for bad files
        raise EngineError(f"{path}: cannot load tokenizer: {exc}") from exc


class _Wrapped:
    def __init__(self, tok) -> None:
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text).ids
        if not ids:
            raise EngineError("--prompt: the text encodes to no tokens")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)
