"""What makes two trainings the same: the settings that change the trained weights, a short hash
of them for checkpoint names, and a readable list of differences.

A checkpoint's name carries :func:`identity_hash` of its training identity (a nested dict of
JSON values: training flags, encoder, splits, a digest of the training data ...), and its JSON
stores the identity itself. Rerunning with the same settings finds the same file; changing any
setting that changes the weights gives another name, so a sweep never silently reuses a model
trained under other flags. Evaluating a checkpoint under other flags is legitimate, so there
:func:`identity_differences` only says what differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Sequence

HASH_LENGTH = 10  # hex digits in names: 40 bits, no collision within any realistic sweep


def identity_hash(identity: dict[str, Any]) -> str:
    """Short stable hash of an identity (key order does not matter)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def samples_digest(splits: Iterable[Sequence[Any]]) -> str:
    """Digest of what training reads from supervision files: per split, in order, each
    question's text and valid programs. Other fields (test questions, search statistics,
    metadata) do not change the weights and are left out."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(b"\x01")
        for sample in split:
            digest.update(json.dumps([sample.question, [list(p) for p in sample.valid_paths]]).encode())
            digest.update(b"\x00")
    return digest.hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


_ABSENT = object()


def _show(value: Any) -> str:
    return "(not recorded)" if value is _ABSENT else json.dumps(value)


def identity_differences(
    stored: dict[str, Any], current: dict[str, Any], only_common: bool = False
) -> list[str]:
    """``["training.learning_rate: 0.0005 (checkpoint) vs 0.0001 (these flags)", ...]``.

    ``only_common`` compares only the settings both sides record (a checkpoint from before the
    identity was stored records just some of them).
    """
    a, b = _flatten(stored), _flatten(current)
    keys = sorted(set(a) & set(b)) if only_common else sorted(set(a) | set(b))
    lines = []
    for key in keys:
        left, right = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if left != right:
            lines.append(f"{key}: {_show(left)} (checkpoint) vs {_show(right)} (these flags)")
    return lines
