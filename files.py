"""Atomic outputs: write to a temporary file beside the destination, then rename; never a partial file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dsc.errors import CompileError


def check_writable_dir(path: Path) -> None:
    """Fail early, with the directory named, when ``path`` cannot be created there."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise CompileError(f"{parent}: output directory does not exist")
    if not parent.is_dir():
        raise CompileError(f"{parent}: output directory is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CompileError(f"{parent}: output directory is not writable")
    # os.access says yes to root everywhere; creating a file is the test that holds for every user and file
    # system (read-only mounts, /proc)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=parent)
    except OSError as exc:
        raise CompileError(f"{parent}: output directory is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path``, on any failure it is removed."""
    path = Path(path)
    check_writable_dir(path)
    if path.is_dir():
        raise CompileError(f"{path}: is a directory, not a file name")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError):  # disk full, quota, a file system gone read-only: the user's to fix
            raise CompileError(f"{path}: cannot write: {exc.strerror or exc}") from exc
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``path.write_bytes(data)``, except that readers see the old file or the new one, never a part."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def sha256_files(paths: list[Path]) -> str:
    """One digest over the files' bytes, in order (engine checksums in manifests)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def read_json(path: Path, what: str, error: type[Exception] = CompileError) -> object:
    """The parsed JSON of ``path``; ``error`` naming the file and ``what`` it should hold when it cannot be read."""
    import json

    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from exc
