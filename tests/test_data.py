"""Supervision files: the three shapes, aliases, one-line errors, splits, summary, validate CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polar.cli import main
from polar.data import (
    Sample,
    SupervisionError,
    load_samples,
    load_samples_with_metadata,
    save_samples,
    split_samples,
    summarize_samples,
    supervision_path,
)
from polar.errors import DataError

D = 6
SAMPLE = {
    "question": "Solve ...",
    "gt_ans": "\\boxed{42}",
    "initial_score": 0.0,
    "final_valid_transitions": [[0, 1, 2, 4, 5], [0, 1, 2, 2, 3, 4, 5]],
    "final_invalid_transitions": [[0, 1, 3, 4, 5]],
}


def _write(tmp_path: Path, obj, name: str = "s.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")
    return path


@pytest.mark.parametrize("shape", ["samples", "list", "mapping"])
def test_three_shapes_give_the_same_samples(tmp_path, shape):
    other = {"question": "Q2", "answer": "7", "final_valid_transitions": [[0, 1, 2, 3, 4, 5]]}
    wrapped = {
        "samples": {"samples": [SAMPLE, other]},
        "list": [SAMPLE, other],
        "mapping": {"a": SAMPLE, "b": other},
    }[shape]
    samples = load_samples(_write(tmp_path, wrapped))
    assert [s.index for s in samples] == [0, 1]
    first = samples[0]
    assert first.question == "Solve ..." and first.answer == "\\boxed{42}"
    assert first.valid_paths == SAMPLE["final_valid_transitions"]
    assert first.invalid_paths == [[0, 1, 3, 4, 5]]
    assert first.initial_score == 0.0
    assert samples[1].answer == "7" and samples[1].invalid_paths == [] and samples[1].initial_score is None
    if shape == "mapping":
        assert [s.id for s in samples] == ["a", "b"]


@pytest.mark.parametrize(
    "fields, answer",
    [
        ({"ground_truth": "1"}, "1"),
        ({"answer": 3}, "3"),
        ({"sample_info": {"ground_truth": "4"}}, "4"),
        ({"sample_info": {"answer": "5"}}, "5"),
        ({"gt_ans": "6", "answer": "not this"}, "6"),
    ],
)
def test_answer_aliases(tmp_path, fields, answer):
    obj = {"sample_info": {"question": "Q"}, "final_valid_transitions": [[0]]}
    obj = {**obj, **fields, "sample_info": {**obj["sample_info"], **fields.get("sample_info", {})}}
    (sample,) = load_samples(_write(tmp_path, [obj]))
    assert sample.question == "Q" and sample.answer == answer


MALFORMED = [
    ({"gt_ans": "1", "final_valid_transitions": [[0]]}, "sample 1: missing question"),
    ({"question": "Q", "final_valid_transitions": [[0]]}, "sample 1: missing answer"),
    ({"question": "Q", "gt_ans": "1"}, "sample 1: missing field 'final_valid_transitions'"),
    ({"question": "Q", "gt_ans": "1", "final_valid_transitions": "0,1"}, "sample 1: final_valid_transitions must be a list"),
    ({"question": "Q", "gt_ans": "1", "final_valid_transitions": [[0], []]},
     "sample 1: final_valid_transitions[1] must be a non-empty list of layer indices"),
    ({"question": "Q", "gt_ans": "1", "final_valid_transitions": [[0, True]]},
     "sample 1: final_valid_transitions[0] must be a non-empty list of layer indices"),
    ({"question": "Q", "gt_ans": "1", "final_valid_transitions": [[0, "1"]]},
     "sample 1: final_valid_transitions[0] must be a non-empty list"),
    ({"question": "Q", "gt_ans": "1", "final_valid_transitions": [[0, -1]]},
     "sample 1: final_valid_transitions[0] must be a non-empty list"),
    ({"question": "Q", "gt_ans": "1", "final_valid_transitions": [[0]], "final_invalid_transitions": [[1.5]]},
     "sample 1: final_invalid_transitions[0] must be a non-empty list"),
    ({"question": "Q", "gt_ans": "1", "final_valid_transitions": [[0]], "initial_score": "yes"},
     "sample 1: initial_score must be a number"),
    ({"question": ["Q"], "gt_ans": "1", "final_valid_transitions": [[0]]}, "sample 1: question must be text"),
    ("not an object", "sample 1: must be an object"),
]


@pytest.mark.parametrize("bad, message", MALFORMED)
def test_malformed_sample_names_file_sample_and_field(tmp_path, bad, message):
    path = _write(tmp_path, {"samples": [SAMPLE, bad]}, "x.json")
    with pytest.raises(SupervisionError) as err:
        load_samples(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text
    assert "\n" not in text
    assert isinstance(err.value, DataError)


def test_bad_json_reports_line_and_column(tmp_path):
    path = _write(tmp_path, '{"samples": [\n  {"question": "Q",}\n]}', "bad.json")
    with pytest.raises(SupervisionError, match=r"bad\.json: invalid JSON at line 2, column 20"):
        load_samples(path)


def test_bad_top_level_and_missing_file(tmp_path):
    with pytest.raises(SupervisionError, match="expected an object"):
        load_samples(_write(tmp_path, "42"))
    with pytest.raises(SupervisionError, match="'samples' must be a list"):
        load_samples(_write(tmp_path, {"samples": {"a": 1}}))
    with pytest.raises(SupervisionError, match="nope.json: file not found"):
        load_samples(tmp_path / "nope.json")


def test_supervision_path_layout():
    path = supervision_path("data", "meta-llama/Llama-3.2-3B-Instruct", 1)
    assert path == Path("data/meta-llama/Llama-3.2-3B-Instruct/dart-math-diff-1/merged_mcts_samples.json")
    assert supervision_path("root", "/abs/model", 3) == Path("root/abs/model/dart-math-diff-3/merged_mcts_samples.json")
    with pytest.raises(ValueError, match="difficulty"):
        supervision_path("data", "m", 6)


def _samples(n: int) -> list[Sample]:
    return [Sample(index=i, id=str(i), question="q", answer="a", valid_paths=[[0]]) for i in range(n)]


def test_reference_splits():
    train, val, test = split_samples(_samples(2100))
    assert (train[0].index, train[-1].index, len(train)) == (0, 1249, 1250)
    assert (val[0].index, val[-1].index, len(val)) == (1250, 1499, 250)
    assert (test[0].index, test[-1].index, len(test)) == (1500, 1999, 500)
    train, val, test = split_samples(_samples(2100), num_samples=100, no_validation=True)
    assert len(train) == 1500 and val == [] and [s.index for s in test] == list(range(1500, 1600))
    train, val, test = split_samples(_samples(1300))  # short files give short splits
    assert (len(train), len(val), len(test)) == (1250, 50, 0)


def test_summary_counts_by_hand():
    samples = [
        Sample(0, "0", "q", "a", valid_paths=[[0, 1, 2, 4, 5], [0, 1, 2, 2, 3, 4, 5]], invalid_paths=[[0]], initial_score=0.0),
        # [0, 2, 1] is out of order: no segment parse
        Sample(1, "1", "q", "a", valid_paths=[[0, 2, 1], [0, 1, 2, 3, 4, 5]], initial_score=1.0),
        Sample(2, "2", "q", "a", valid_paths=[]),
    ]
    summary = summarize_samples(samples, num_layers=D)
    assert summary["samples"] == 3
    assert summary["valid_paths"] == 4 and summary["invalid_paths"] == 1
    assert summary["samples_without_valid_path"] == 1
    assert summary["unparseable_valid_paths"] == 1
    assert summary["mean_valid_path_length"] == pytest.approx((5 + 7 + 3 + 6) / 4)
    assert summary["mean_valid_length_ratio"] == pytest.approx((5 + 7 + 3 + 6) / 4 / D)
    assert summary["base_accuracy"] == pytest.approx(0.5)
    unknown = summarize_samples(samples)
    assert unknown["num_layers"] == D and unknown["mean_valid_length_ratio"] is None


def test_save_then_load_round_trip(tmp_path):
    path = save_samples(tmp_path / "out" / "merged_mcts_samples.json", [SAMPLE], {"settings": {"num_layers": D}})
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "samples"}
    samples, metadata = load_samples_with_metadata(path)
    assert samples[0].valid_paths == SAMPLE["final_valid_transitions"] and metadata["settings"]["num_layers"] == D
    assert not list(path.parent.glob("*.tmp"))


# --------------------------------------------------------------------------- polar validate


def test_validate_prints_summary_and_uses_metadata_depth(tmp_path, capsys):
    path = save_samples(tmp_path / "good.json", [SAMPLE], {"settings": {"num_layers": D}})
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: ok" in out and "samples: 1" in out and "valid_paths: 2" in out
    assert f"mean_valid_length_ratio: {6 / D:.4g}" in out  # (5 + 7) / 2 / 6


def test_validate_without_depth_reports_no_ratio(tmp_path, capsys):
    path = _write(tmp_path, [SAMPLE])
    assert main(["validate", str(path)]) == 0
    assert "mean_valid_length_ratio: -" in capsys.readouterr().out
    assert main(["validate", str(path), "--num_layers", "12"]) == 0
    assert "mean_valid_length_ratio: 0.5" in capsys.readouterr().out


def test_validate_bad_file_is_one_line_error_and_exit_2(tmp_path, capsys):
    good = _write(tmp_path, [SAMPLE], "good.json")
    bad = _write(tmp_path, [SAMPLE, {"question": "Q", "gt_ans": "1", "final_valid_transitions": [[0], []]}], "bad.json")
    assert main(["validate", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert f"{good}: ok" in captured.out
    err_lines = captured.err.strip().splitlines()
    assert err_lines == [f"error: {bad}: sample 1: final_valid_transitions[1] must be a non-empty list of layer indices"]
    assert "Traceback" not in captured.err


def test_validate_malformed_json_exit_2(tmp_path, capsys):
    bad = _write(tmp_path, "[{", "broken.json")
    assert main(["validate", str(bad)]) == 2
    assert "broken.json: invalid JSON at line 1" in capsys.readouterr().err
