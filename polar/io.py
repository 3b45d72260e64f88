"""Small file helpers every long job uses: atomic writes and the settings block of outputs.

Outputs are written to a temporary file in the same directory and renamed into place, so an
interrupted run never leaves a half-written JSON behind and readers never see one.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from polar.errors import DataError

PROGRAM_SEMANTICS = "unrolled: every program position has its own KV state"


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed row)`` for each non-blank line of a JSONL file; invalid JSON or text
    that is not UTF-8 is a :class:`polar.errors.DataError` naming the file and line."""
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: a byte-order mark some editors write is skipped
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {line_no}: invalid JSON ({err.msg})") from None
                except RecursionError:
                    raise DataError(f"{path}: line {line_no}: JSON nested too deeply") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Raise ``DataError`` unless ``path`` is, or can be created as, a folder we can write in.

    Jobs write their results at the end (a checkpoint after training, an evaluation after every
    program has run), so an output folder that cannot be written must stop the job at its start,
    not after hours of work. Nothing is left behind: the check creates and removes a folder in
    the deepest part of ``path`` that exists.
    """
    path = Path(path).expanduser()
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"argument {flag}: cannot write in {path} ({existing} is not a folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".polar-write-check.", dir=existing))
    except OSError as err:
        raise DataError(f"argument {flag}: cannot write in {path} ({err.strerror or err})") from None
    return path


@contextmanager
def collection_paused() -> Iterator[None]:
    """Pause Python's automatic cyclic garbage collector inside the block (restored after).

    Building millions of small objects (parsing a large supervision file, growing search trees)
    triggers collections that rescan every live object, again and again: measured 3-4x slower
    reading a 150 MB file and ~2x slower search logic. The objects built there hold no cycles
    that need the collector while the block runs."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file + rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Serialise ``obj`` as JSON and write it atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour changes results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("polar-layers", "torch", "transformers", "math-verify"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_metadata(**settings: Any) -> dict[str, Any]:
    """The block every output file carries: the settings that produced it, plus versions."""
    return {
        "settings": settings,
        "program_semantics": PROGRAM_SEMANTICS,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
