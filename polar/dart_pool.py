"""The DART-Math query pool and the release's question selection.

The paper's search questions come from the DART-Math query pool (``hkust-nlp/dart-math-pool-math``,
train split). The pool holds many rows per question (one per synthesised response), so *which*
rows become the questions matters: search labels, the train/validation/test splits and every
reported number index the resulting list. The release (``mcts_discovery/run_mcts.py``,
``sample_dataset``) selects them like this, and so do we:

1. walk the pool in dataset order and take the first ``sample_size`` (2000) rows whose
   ``query_metadata.level`` equals the difficulty;
2. THEN drop rows whose ``query_id`` was already taken, keeping the first (so fewer than
   ``sample_size`` questions may remain);
3. a row without ``query_metadata.level`` counts as level 0, so it is never a question of
   levels 1-5.

Without a difficulty the release takes ``max(1, sample_size // number_of_levels)`` rows of each
level (levels in order of first appearance), merges them in dataset order, then de-duplicates.

Rows come from the hub (``datasets`` streaming, the same row order as the release's
``load_dataset``) or from a local copy in the pool's schema — a ``.jsonl``, ``.json`` or
``.parquet`` file, or a folder of them such as a downloaded snapshot. Only the source differs;
selection, validation and the resulting questions are the same code.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polar.errors import DataError, PolarError
from polar.io import iter_jsonl

DART_HUB_ID = "hkust-nlp/dart-math-pool-math"
DART_SAMPLE_SIZE = 2000
NO_LEVEL = 0  # the release reads a missing level as 0
POOL_SUFFIXES = (".jsonl", ".json", ".parquet")
_PARQUET_BATCH = 4096


class PoolUnavailable(PolarError):
    """The hub pool could not be opened (no ``datasets`` package, no network, hub error)."""


@dataclass(frozen=True)
class PoolQuestion:
    """One selected question; ``row`` is its position in the pool (dataset order)."""

    query_id: Hashable
    query: str
    gt_ans: str
    level: int | None
    row: int


# --------------------------------------------------------------------------- sources


def is_local_pool(source: str | Path) -> bool:
    """True for an existing pool file (``.jsonl`` / ``.json`` / ``.parquet``) or folder."""
    path = Path(source)
    return path.is_dir() or (path.is_file() and path.suffix.lower() in POOL_SUFFIXES)


def pool_rows(source: str | Path = DART_HUB_ID) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of the pool in dataset order.

    ``where`` names the file (or hub id) and row for error messages. A path that exists is read
    locally; anything else is taken as a hub dataset id.
    """
    path = Path(source)
    if path.is_dir():
        for file in _pool_files(path):
            yield from _file_rows(file)
    elif path.is_file():
        yield from _file_rows(path)
    else:
        yield from _hub_rows(str(source))


def _pool_files(folder: Path) -> list[Path]:
    """Data files of a folder in name order; only the ``train*`` files when there are any.

    A hub snapshot keeps its data as ``data/train-0000k-of-0000n.parquet``: name order is
    dataset order. Hidden folders (download caches) are skipped.
    """
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in POOL_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    train = [p for p in files if p.name.startswith("train")]
    if not files:
        raise DataError(f"{folder}: no {', '.join(POOL_SUFFIXES)} files in this folder")
    return train or files


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise DataError(f"{path}: a DART-Math pool file must end in {', '.join(POOL_SUFFIXES)}")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for index, (line_no, row) in enumerate(iter_jsonl(path)):
        yield f"{path}: row {index} (line {line_no})", row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a question pool") from None
    if isinstance(data, dict) and isinstance(data.get("train"), list):
        data = data["train"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of pool rows (or an object with a 'train' list)")
    for index, row in enumerate(data):
        yield f"{path}: row {index}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PolarError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}: row {index}", row
                index += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({_first_line(err)})") from None


def _hub_rows(hub_id: str) -> Iterator[tuple[str, Any]]:
    """Stream the train split. A source that cannot be opened raises :class:`PoolUnavailable`;
    one that fails after rows were read is an error (switching sources mid-way would mix pools)."""
    try:
        import datasets
    except ImportError:
        raise PoolUnavailable("the `datasets` package is not installed (pip install datasets)") from None
    try:
        iterator = iter(datasets.load_dataset(hub_id, split="train", streaming=True))
        row = next(iterator, None)
    except Exception as err:  # network, authentication, unknown id: all mean "not available here"
        raise PoolUnavailable(f"{type(err).__name__}: {_first_line(err)}") from None
    index = 0
    while row is not None:
        yield f"{hub_id} (train split): row {index}", row
        index += 1
        try:
            row = next(iterator, None)
        except Exception as err:
            raise PolarError(f"{hub_id}: reading the pool failed after {index} rows "
                             f"({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


# --------------------------------------------------------------------------- fields


def _metadata(where: str, row: Any) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a pool row must be an object, got {type(row).__name__}")
    if "query_metadata" not in row:
        raise DataError(f"{where}: field 'query_metadata' is missing")
    metadata = row["query_metadata"]
    if isinstance(metadata, str):  # some exports keep the struct as JSON text
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field 'query_metadata' is text that is not a JSON object") from None
    if not isinstance(metadata, Mapping):
        raise DataError(f"{where}: field 'query_metadata' must be an object, got {type(metadata).__name__}")
    return metadata


def row_level(where: str, row: Any) -> Hashable:
    """The row's level as the release groups it: an integer, ``NO_LEVEL`` when absent.

    Integral floats (``3.0``) and text such as ``"3"`` or ``"Level 3"`` count as that level;
    ``null`` and other text form groups of their own that match no difficulty.
    """
    metadata = _metadata(where, row)
    if "level" not in metadata:
        return NO_LEVEL
    value = metadata["level"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: field 'query_metadata.level' must be an integer, got {value!r}")
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, str):
        text = value.strip()
        for prefix in ("Level", "level"):
            text = text.removeprefix(prefix).strip()
        return int(text) if text.isdigit() else value
    return value


def _query_id(where: str, row: Mapping[str, Any]) -> Hashable:
    value = row.get("query_id")
    if value is None:
        raise DataError(f"{where}: field 'query_id' is missing")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field 'query_id' must be text or an integer, got {type(value).__name__}")
    return value


def _question(where: str, row: Mapping[str, Any], index: int, level: Hashable, query_id: Hashable) -> PoolQuestion:
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        problem = "is missing" if query is None else "must be non-empty text"
        raise DataError(f"{where}: field 'query' {problem}")
    answer = row.get("gt_ans")
    if answer is None:
        raise DataError(f"{where}: field 'gt_ans' is missing")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: field 'gt_ans' must be text or a number, got {type(answer).__name__}")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return PoolQuestion(query_id=query_id, query=query, gt_ans=str(answer).strip(),
                        level=level if isinstance(level, int) else None, row=index)


# --------------------------------------------------------------------------- selection


def select_questions(
    rows: Iterable[tuple[str, Any]], level: int | None, sample_size: int = DART_SAMPLE_SIZE
) -> list[PoolQuestion]:
    """The release's ``sample_dataset``: first ``sample_size`` rows of ``level``, then de-duplicated.

    Rows are read only as far as needed: with a level, reading stops at the ``sample_size``-th
    row of that level.
    """
    if sample_size < 1:
        raise ValueError(f"sample_size must be at least 1, got {sample_size}")
    picked: list[tuple[int, str, Mapping[str, Any], Hashable]] = []
    if level is not None:
        for index, (where, row) in enumerate(rows):
            row_lvl = row_level(where, row)
            if row_lvl == level:
                picked.append((index, where, row, row_lvl))
                if len(picked) == sample_size:
                    break
    else:
        by_level: dict[Hashable, list[tuple[int, str, Mapping[str, Any], Hashable]]] = {}
        for index, (where, row) in enumerate(rows):
            row_lvl = row_level(where, row)
            group = by_level.setdefault(row_lvl, [])
            if len(group) < sample_size:  # no level can take more than this
                group.append((index, where, row, row_lvl))
        per_level = max(1, sample_size // len(by_level)) if by_level else 0
        picked = sorted((item for group in by_level.values() for item in group[:per_level]), key=lambda item: item[0])
    questions: list[PoolQuestion] = []
    seen: set[Hashable] = set()
    for index, where, row, row_lvl in picked:
        query_id = _query_id(where, row)
        if query_id in seen:
            continue
        seen.add(query_id)
        questions.append(_question(where, row, index, row_lvl, query_id))
    return questions


def load_pool_questions(
    source: str | Path = DART_HUB_ID, level: int | None = None, sample_size: int = DART_SAMPLE_SIZE
) -> list[PoolQuestion]:
    """Select the questions of ``level`` from the pool at ``source`` (hub id, file or folder)."""
    return select_questions(pool_rows(source), level, sample_size)
