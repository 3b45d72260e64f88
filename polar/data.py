"""Supervision files: the programs search found for each question, as the predictor reads them.

The format is the release's (a compatibility contract): ``merged_mcts_samples.json`` per model
and difficulty, in one of three shapes (``{"samples": [...]}``, a list, or an object whose values
are samples), with a few aliases for the question and answer fields. Files are validated once,
here, and every problem is reported as one line naming the file, the sample and the field —
training on a silently skipped or misread sample is worse than stopping.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polar.errors import DataError, check_text
from polar.io import collection_paused, write_json_atomic
from polar.programs import MAX_LAYER_USES, MAX_NUM_LAYERS, path_to_segments

SUPERVISION_FILENAME = "merged_mcts_samples.json"
DIFFICULTIES = (1, 2, 3, 4, 5)
TRAIN_END, VAL_END = 1250, 1500  # reference split boundaries per difficulty

_ANSWER_FIELDS = ("gt_ans", "ground_truth", "answer")


class SupervisionError(DataError):
    """A supervision file is malformed; the message names file, sample index and field."""


@dataclass
class Sample:
    """One question of a supervision file with its valid / invalid programs.

    ``index`` is the position in the file (the splits are positional); ``raw`` is the original
    object, so tools that rewrite files keep fields this class does not know about.
    """

    index: int
    id: str
    question: str
    answer: str
    valid_paths: list[list[int]]
    invalid_paths: list[list[int]] = field(default_factory=list)
    initial_score: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------- loading


class _DuplicateKey(ValueError):
    """An object of the file names one key twice; ``json`` would silently keep only the last."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses duplicate keys: in the object-of-samples shape a
    repeated question id would drop a sample, and a repeated field would drop one of its values."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return obj


def _read_json(path: Path) -> Any:
    """The parsed file. A UTF-8 byte-order mark (as some editors write) is skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SupervisionError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SupervisionError(f"{path}: is a directory, expected a JSON file") from None
    except UnicodeDecodeError as err:
        raise SupervisionError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:  # no permission, a symlink loop, an I/O error
        raise SupervisionError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise SupervisionError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise SupervisionError(f"{path}: JSON nested too deeply to be a supervision file") from None
    except _DuplicateKey as err:
        raise SupervisionError(f"{path}: key {str(err)!r} appears twice in one object; "
                               "JSON readers keep only one of them, so the file is ambiguous") from None


def _sample_objects(path: Path, data: Any) -> tuple[list[tuple[str | None, Any]], dict[str, Any]]:
    """The three accepted shapes -> [(key or None, sample)], plus the file's metadata block."""
    if isinstance(data, list):
        return [(None, s) for s in data], {}
    if isinstance(data, dict):
        if "samples" in data:
            if not isinstance(data["samples"], list):
                raise SupervisionError(f"{path}: field 'samples' must be a list, got {type(data['samples']).__name__}")
            metadata = data.get("metadata")
            return [(None, s) for s in data["samples"]], metadata if isinstance(metadata, dict) else {}
        return [(str(k), v) for k, v in data.items()], {}
    raise SupervisionError(
        f"{path}: expected an object with a 'samples' list, a list of samples, or an object of "
        f"samples; got {type(data).__name__}"
    )


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_program(value: Any) -> bool:
    """A non-empty list of non-negative ints (not bools, not floats such as ``1.0``).

    Written with C-level builtins: a large file holds millions of programs."""
    return type(value) is list and bool(value) and set(map(type, value)) == {int} and min(value) >= 0


def _all_programs(paths: list[Any]) -> bool:
    """:func:`_is_program` for every entry, in one pass over all their layers."""
    if not paths:
        return True
    if set(map(type, paths)) != {list} or not all(paths):
        return False
    return set(map(type, chain.from_iterable(paths))) == {int} and min(chain.from_iterable(paths)) >= 0


def _paths(where: str, obj: dict[str, Any], name: str, required: bool) -> list[list[int]]:
    if name not in obj or obj[name] is None:
        if required:
            raise SupervisionError(f"{where}: missing field '{name}' (a list of layer paths)")
        return []
    value = obj[name]
    if not isinstance(value, list):
        raise SupervisionError(f"{where}: {name} must be a list of paths, got {type(value).__name__}")
    if not _all_programs(value):
        k = next(k for k, path in enumerate(value) if not _is_program(path))
        raise SupervisionError(f"{where}: {name}[{k}] must be a non-empty list of layer indices")
    return [list(p) for p in value]


def _text_field(where: str, obj: dict[str, Any], names: Sequence[str], label: str) -> str:
    info = obj.get("sample_info") if isinstance(obj.get("sample_info"), dict) else {}
    candidates = [(n, obj.get(n)) for n in names] + [(f"sample_info.{n}", info.get(n)) for n in names]
    for name, value in candidates:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SupervisionError(f"{where}: {name} must be text, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SupervisionError(f"{where}: {name} must be text, got {value!r} (NaN and Infinity are not JSON)")
        if not str(value).strip():
            raise SupervisionError(f"{where}: {name} is empty")
        return check_text(str(value), f"{where}: {name}", SupervisionError)
    tried = ", ".join(n for n, _ in candidates)
    raise SupervisionError(f"{where}: missing {label} (looked for {tried})")


def _initial_score(where: str, obj: dict[str, Any]) -> float | None:
    value = obj.get("initial_score")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SupervisionError(f"{where}: initial_score must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise SupervisionError(f"{where}: initial_score must be a finite number, got {value!r}")
    return float(value)


def parse_sample(path: Path | str, index: int, obj: Any, key: str | None = None) -> Sample:
    """Validate one sample object; errors name ``path``, ``index`` and the field."""
    where = f"{path}: sample {index}"
    if not isinstance(obj, dict):
        raise SupervisionError(f"{where}: must be an object, got {type(obj).__name__}")
    question = _text_field(where, obj, ("question",), "question")
    answer = _text_field(where, obj, _ANSWER_FIELDS, "answer")
    info = obj.get("sample_info") if isinstance(obj.get("sample_info"), dict) else {}
    sample_id = obj.get("id", obj.get("query_id", info.get("id", key if key is not None else index)))
    return Sample(
        index=index,
        id=str(sample_id),
        question=question,
        answer=answer,
        valid_paths=_paths(where, obj, "final_valid_transitions", required=True),
        invalid_paths=_paths(where, obj, "final_invalid_transitions", required=False),
        initial_score=_initial_score(where, obj),
        raw=obj,
    )


def load_samples_with_metadata(path: str | os.PathLike) -> tuple[list[Sample], dict[str, Any]]:
    """Samples of a supervision file plus its ``metadata`` block (empty when the file has none)."""
    path = Path(path)
    with collection_paused():  # a large file becomes millions of small lists
        objects, metadata = _sample_objects(path, _read_json(path))
        return [parse_sample(path, i, obj, key) for i, (key, obj) in enumerate(objects)], metadata


def load_samples(path: str | os.PathLike) -> list[Sample]:
    """All samples of a supervision file, validated (raises :class:`SupervisionError`)."""
    return load_samples_with_metadata(path)[0]


# --------------------------------------------------------------------------- depth and runnable programs


@dataclass(frozen=True)
class Depth:
    """The model depth a file is checked against, and where it came from (said to the user).

    ``checks_indices`` is False when the depth was only guessed from the highest index in the
    file: then no index can be out of range by construction, and the user should know it.
    """

    num_layers: int | None
    source: str
    checks_indices: bool = True


def recorded_depth(path: Path | str, metadata: dict[str, Any]) -> Depth | None:
    """The depth the file's metadata records (``settings.num_layers`` or ``num_layers``).

    A recorded value that is not a whole number in ``[1, MAX_NUM_LAYERS]`` is an error naming the
    field: checking programs against a made-up depth would be a silent "ok".
    """
    for prefix, block in (("metadata.settings", metadata.get("settings")), ("metadata", metadata)):
        if not isinstance(block, dict) or "num_layers" not in block or block["num_layers"] is None:
            continue
        value = block["num_layers"]
        if not _is_index(value) or not 1 <= value <= MAX_NUM_LAYERS:
            raise SupervisionError(
                f"{path}: {prefix}.num_layers must be a whole number of layers in 1-{MAX_NUM_LAYERS}, got {value!r}"
            )
        return Depth(int(value), f"{prefix}.num_layers")
    return None


def _programs(sample: Sample):
    """``(field, k, program)`` for every program of a sample, valid ones first."""
    for k, program in enumerate(sample.valid_paths):
        yield "final_valid_transitions", k, program
    for k, program in enumerate(sample.invalid_paths):
        yield "final_invalid_transitions", k, program


def infer_depth(samples: Sequence[Sample]) -> Depth:
    """The depth of a file that records none.

    Search output holds the full-depth program ``[0, ..., D-1]`` (the root of every search) in
    every sample, so a ``D`` whose full program occurs in every sample is the depth, and indices
    can be checked against it. Otherwise the only guess is the highest index + 1, which can never
    flag an index as out of range; the source says so.
    """
    common: set[int] | None = None
    highest, where = -1, ""
    for sample in samples:
        full = set()
        for field_name, k, program in _programs(sample):
            top = max(program)
            if top > highest:
                highest, where = top, f"sample {sample.index} {field_name}[{k}]"
            if program[0] == 0 and top == len(program) - 1 and program == list(range(len(program))):
                full.add(len(program))
        common = full if common is None else common & full
    if common:
        depth = max(common)
        return Depth(depth, f"the full-depth program 0-{depth - 1}, present in every sample (inferred)")
    if highest < 0:
        return Depth(None, "nowhere: the file holds no programs", checks_indices=False)
    return Depth(highest + 1, f"the highest layer index {highest} + 1 ({where}; inferred, so indices are "
                 "unchecked: pass --num_layers or --model_path)", checks_indices=False)


def program_problems(path: Path | str, samples: Sequence[Sample], depth: Depth) -> list[str]:
    """One message per program that cannot run: an index the model does not have, or a layer
    run more than twice (no segment parse, and outside every search's moves). Training skips and
    counts such programs; ``polar validate`` reports them as errors."""
    limit = depth.num_layers if depth.checks_indices and depth.num_layers else MAX_NUM_LAYERS
    problems: list[str] = []
    runnable: set[tuple[int, ...]] = set()  # files repeat programs (the full one is in every sample)
    for sample in samples:
        for field_name, k, program in _programs(sample):
            key = tuple(program)
            if key in runnable:
                continue
            where = f"{path}: sample {sample.index}: {field_name}[{k}]"
            if max(program) >= limit:
                bad = next(pos for pos, layer in enumerate(program) if layer >= limit)
                if limit == MAX_NUM_LAYERS and not depth.checks_indices:
                    problems.append(f"{where}[{bad}] is layer {program[bad]}, beyond any model "
                                    f"(at most {MAX_NUM_LAYERS} layers)")
                else:
                    problems.append(f"{where}[{bad}] is layer {program[bad]}, but the model has {limit} layers "
                                    f"(indices 0-{limit - 1}; depth from {depth.source})")
                continue
            counts = Counter(program)
            over = next((layer for layer in program if counts[layer] > MAX_LAYER_USES), None)
            if over is not None:
                problems.append(f"{where} runs layer {over} {counts[over]} times; a program runs a layer "
                                f"at most {MAX_LAYER_USES} times (skip, keep or repeat)")
            else:
                runnable.add(key)
    return problems


# --------------------------------------------------------------------------- layout and splits


def model_dir_name(model_path: str) -> str:
    """Directory name for a model under the output root.

    Hub ids stay as they are (``meta-llama/Llama-3.2-3B-Instruct`` gives two levels, as in the
    release). An existing local file (e.g. ``.../SmolLM2-135M-Instruct.Q4_1.gguf``) uses its file
    name without the extension, and an existing local directory its last component, so outputs
    never depend on where the user keeps their weights.
    """
    path = Path(model_path).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return model_path.strip("/")


def supervision_path(data_root: str | os.PathLike, model_path: str, difficulty: int) -> Path:
    """``{data_root}/{model}/dart-math-diff-{N}/merged_mcts_samples.json`` (release layout),
    with ``{model}`` from :func:`model_dir_name` — the same place ``polar search`` writes to.

    A ``data_root`` that already ends in ``{model}`` is used as it is, as the release resolves
    it (``resolve_dart_base_path``); we compare whole path components, so ``.../MyModel`` does
    not count as ending in ``Model``.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    root, model = Path(data_root), Path(model_dir_name(model_path))
    if not (len(root.parts) >= len(model.parts) and root.parts[-len(model.parts):] == model.parts):
        root = root / model
    return root / f"dart-math-diff-{difficulty}" / SUPERVISION_FILENAME


def split_samples(
    samples: Sequence[Sample],
    num_samples: int = 500,
    no_validation: bool = False,
    train_size: int = TRAIN_END,
    val_size: int = VAL_END - TRAIN_END,
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Reference splits: train [0:1250], val [1250:1500], test [1500:1500+num_samples].

    With ``no_validation`` train is [0:1500] and val is empty; test is unchanged.
    ``train_size`` / ``val_size`` scale the protocol down for small files (e.g. 125 / 25).
    """
    if num_samples < 0 or train_size < 0 or val_size < 0:
        raise ValueError("split sizes and num_samples must not be negative")
    samples = list(samples)
    val_end = train_size + val_size
    test = samples[val_end: val_end + num_samples]
    if no_validation:
        return samples[:val_end], [], test
    return samples[:train_size], samples[train_size:val_end], test


# --------------------------------------------------------------------------- summary and saving


def _infer_num_layers(samples: Sequence[Sample]) -> int | None:
    highest = max((max(p) for s in samples for p in s.valid_paths + s.invalid_paths), default=None)
    return None if highest is None else highest + 1


def summarize_samples(samples: Sequence[Sample], num_layers: int | None = None) -> dict[str, Any]:
    """What a supervision file holds, for ``polar validate`` and training logs.

    Paths are parsed into the segmentation form with the known depth ``num_layers`` (or, when it
    is unknown, the highest layer index seen + 1, and then no length ratio is reported): paths
    with no exact parse are dropped by training, so their count matters.
    """
    depth = num_layers or _infer_num_layers(samples)
    valid = [p for s in samples for p in s.valid_paths]
    scores = [s.initial_score for s in samples if s.initial_score is not None]
    unparseable = sum(1 for p in valid if depth is None or path_to_segments(p, depth) is None)
    mean_len = sum(map(len, valid)) / len(valid) if valid else None
    return {
        "samples": len(samples),
        "valid_paths": len(valid),
        "invalid_paths": sum(len(s.invalid_paths) for s in samples),
        "samples_without_valid_path": sum(1 for s in samples if not s.valid_paths),
        "unparseable_valid_paths": unparseable,
        "num_layers": depth,
        "num_layers_known": num_layers is not None,
        "mean_valid_path_length": mean_len,
        "mean_valid_length_ratio": (mean_len / num_layers) if (mean_len is not None and num_layers) else None,
        "samples_with_initial_score": len(scores),
        "base_accuracy": (sum(scores) / len(scores)) if scores else None,
    }


def save_samples(path: str | os.PathLike, samples: Sequence[dict[str, Any] | Sample], metadata: dict[str, Any]) -> Path:
    """Write ``{"metadata": ..., "samples": [...]}`` atomically (the release's first shape)."""
    rows = [s.raw if isinstance(s, Sample) else s for s in samples]
    return write_json_atomic(path, {"metadata": metadata, "samples": rows})
