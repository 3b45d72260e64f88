"""polar: run pretrained LLMs as per-input programs of layers, search and learn those programs.

Heavy modules (torch, transformers) load on first use, so ``import polar`` stays cheap for tools
that only read programs or supervision files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polar.programs import (
    format_program,
    full_program,
    parse_program,
    path_to_segments,
    segments_to_path,
    validate_program,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from polar.engine import Generation, ProgramRunner

__all__ = [
    "Generation",
    "ProgramRunner",
    "format_program",
    "full_program",
    "parse_program",
    "path_to_segments",
    "segments_to_path",
    "validate_program",
]


def __getattr__(name: str):
    if name in ("ProgramRunner", "Generation"):
        from polar import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'polar' has no attribute {name!r}")
