"""Text in and out of `dsc run --prompt`, through the tokenizer.json the compile copied beside the engine, and the
checkpoint's chat template (tokenizer_config.json's ``chat_template``, copied beside it) for ``--chat``."""

from __future__ import annotations

import json
from pathlib import Path

from dsc.engine_format import Manifest, folder_engine, tokenizer_config_path
from dsc.errors import EngineError


def _tokenizer_file(engine_path: Path, manifest: Manifest) -> Path:
    name = manifest.tokenizer
    if not name:
        raise EngineError(
            f"{engine_path}: --prompt needs a tokenizer, and none was beside the checkpoint when it was "
            "compiled (put tokenizer.json beside config.json and recompile, or use --prompt-ids)"
        )
    engine_path = folder_engine(Path(engine_path))
    return engine_path / name if engine_path.is_dir() else engine_path.with_name(name)


def load_tokenizer(engine_path: Path, manifest: Manifest):
    path = _tokenizer_file(engine_path, manifest)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise EngineError("--prompt needs the 'tokenizers' package: pip install tokenizers") from None
    try:
        return _Wrapped(Tokenizer.from_file(str(path)))
    except Exception as exc:  # tokenizers raises plain Exceptions for bad files
        raise EngineError(f"{path}: cannot load tokenizer: {exc}") from exc


def chat_prompt(engine_path: Path, manifest: Manifest, text: str) -> str:
    """``text`` as one user turn in the checkpoint's chat template, ready for the assistant's reply (the template is
    rendered in a sandbox, as transformers does)."""
    path = tokenizer_config_path(_tokenizer_file(engine_path, manifest))
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(
            f"{engine_path}: --chat needs the checkpoint's tokenizer_config.json; none was compiled in"
        ) from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path}: unreadable tokenizer config: {exc}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: transformers uses "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise EngineError(f"{path}: no chat_template; --chat needs one (or drop --chat)")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def token(name: str) -> str:
        value = config.get(name)
        return value.get("content", "") if isinstance(value, dict) else value or ""

    try:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(
            messages=[{"role": "user", "content": text}],
            add_generation_prompt=True,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
        )
    except TemplateError as exc:
        raise EngineError(f"{path}: the chat template fails: {exc}") from None


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


class TextStream:
    """Text of a growing token list, piece by piece: each ``add(token)`` returns the text the new token completes
    (empty while a multi-byte character is still partial)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""  # an incomplete UTF-8 sequence: wait for the rest
        new, self.shown = text[len(self.shown) :], text
        return new
