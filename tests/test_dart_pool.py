"""DART-Math pool: the release's question selection, read from local files and from the hub path.

The release (``mcts_discovery/run_mcts.py``, ``sample_dataset``) takes the first 2000 rows of a
level in dataset order and only THEN drops repeated ``query_id``s. Expected lists below are worked
out by hand from the rows written in each test.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

import polar.datasets as ds
from polar.dart_pool import NO_LEVEL, PoolUnavailable, is_local_pool, load_pool_questions, pool_rows, select_questions
from polar.datasets import load_questions
from polar.errors import DataError, PolarError


def row(qid, level, query=None, gt="1", **extra):
    """A pool row in the hub schema; ``level=None`` leaves the level out of the metadata."""
    metadata = {"type": "Algebra"} if level is None else {"level": level, "type": "Algebra"}
    return {"query": query or f"question {qid}?", "gt_ans": gt, "query_id": qid, "query_metadata": metadata,
            "resp": "a synthesised response", **extra}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# index: query_id, level
HAND_ROWS = [
    row("q1", 2),      # 0  level-2 row #1
    row("q2", 1),      # 1
    row("q1", 2),      # 2  level-2 row #2, same query as row 0
    row("q3", 2),      # 3  level-2 row #3
    row("q9", None),   # 4  no level: the release reads it as level 0
    row("q4", 2),      # 5  level-2 row #4 = sample_size: selection stops here
    row("q5", 2),      # 6  past the cut, never a question although new
    row("q2", 2),      # 7
]


def test_first_sample_size_rows_of_the_level_then_deduplicated(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", HAND_ROWS)
    questions = load_pool_questions(pool, level=2, sample_size=4)
    # rows 0, 2, 3, 5 are the first four of level 2; row 2 repeats q1 -> three questions remain
    assert [(q.query_id, q.row) for q in questions] == [("q1", 0), ("q3", 3), ("q4", 5)]
    assert all(q.level == 2 and q.gt_ans == "1" for q in questions)
    assert questions[1].query == "question q3?"


def test_level_one_and_rows_without_a_level(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", HAND_ROWS)
    assert [q.query_id for q in load_pool_questions(pool, level=1, sample_size=4)] == ["q2"]
    assert [(q.query_id, q.row) for q in load_pool_questions(pool, level=NO_LEVEL, sample_size=4)] == [("q9", 4)]
    assert load_pool_questions(pool, level=5, sample_size=4) == []


def test_without_a_level_each_level_gets_an_equal_share(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", HAND_ROWS)
    # levels in order of appearance: 2, 1, 0 -> 6 // 3 = 2 rows each: level 2 rows 0, 2;
    # level 1 row 1 (it has only one); level 0 row 4 -> rows 0, 1, 2, 4 -> q1, q2, (q1), q9
    questions = load_pool_questions(pool, level=None, sample_size=6)
    assert [(q.query_id, q.row) for q in questions] == [("q1", 0), ("q2", 1), ("q9", 4)]
    assert [q.level for q in questions] == [2, 1, 0]
    # a sample_size smaller than the number of levels still takes one row per level
    assert [q.row for q in load_pool_questions(pool, level=None, sample_size=2)] == [0, 1, 4]


def test_default_selection_takes_2000_rows_not_2000_questions(tmp_path):
    # 9000 rows; level = i % 3 + 1; query q{i // 6}, so each level-1 query appears on two
    # consecutive level-1 rows (6k and 6k + 3). Level 1 has 3000 rows; the first 2000 of them
    # (rows 0, 3, ..., 5997) hold q0..q999 twice each -> 1000 questions, q_k from row 6k.
    rows = [row(f"q{i // 6}", i % 3 + 1, gt=str(i)) for i in range(9000)]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    questions = load_questions(str(pool), difficulty=1)
    assert [q.id for q in questions] == [f"dart-q{k}" for k in range(1000)]
    assert [q.extra["pool_row"] for q in questions] == [6 * k for k in range(1000)]
    assert [q.answer for q in questions[:3]] == ["0", "6", "12"]
    assert all(q.source == "dart" and q.level == 1 for q in questions)
    # limit cuts the selected list (what splits and --limit index), not the rows read
    assert load_questions(str(pool), difficulty=1, limit=5) == questions[:5]


def test_levels_written_as_numbers_or_text(tmp_path):
    rows = [row("a", 3.0), row("b", "3"), row("c", "Level 3"), row("d", "Level ?"), row("e", 3),
            {**row("f", 3), "query_metadata": json.dumps({"level": 3})}]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    assert [q.query_id for q in load_pool_questions(pool, level=3)] == ["a", "b", "c", "e", "f"]


def test_json_parquet_and_folder_read_the_same_rows(tmp_path):
    expected = load_pool_questions(write_jsonl(tmp_path / "pool.jsonl", HAND_ROWS), level=2, sample_size=4)
    as_json = tmp_path / "pool.json"
    as_json.write_text(json.dumps(HAND_ROWS))
    wrapped = tmp_path / "split.json"
    wrapped.write_text(json.dumps({"train": HAND_ROWS}))
    assert load_pool_questions(as_json, level=2, sample_size=4) == expected
    assert load_pool_questions(wrapped, level=2, sample_size=4) == expected

    # a snapshot folder: train shards in name order; other splits and hidden caches are ignored
    folder = tmp_path / "snapshot"
    (folder / "data").mkdir(parents=True)
    (folder / ".cache").mkdir()
    write_jsonl(folder / "data" / "train-00001-of-00002.jsonl", HAND_ROWS[4:])
    write_jsonl(folder / "data" / "train-00000-of-00002.jsonl", HAND_ROWS[:4])
    write_jsonl(folder / "data" / "test-00000-of-00001.jsonl", [row("zz", 2)])
    write_jsonl(folder / ".cache" / "train-junk.jsonl", [row("junk", 2)])
    folder_questions = load_pool_questions(folder, level=2, sample_size=4)
    assert [(q.query_id, q.query, q.gt_ans, q.level) for q in folder_questions] == [
        (q.query_id, q.query, q.gt_ans, q.level) for q in expected]
    assert [q.row for q in folder_questions] == [q.row for q in expected]  # rows count across shards
    assert is_local_pool(folder) and is_local_pool(as_json) and not is_local_pool(tmp_path / "nope.jsonl")


def test_parquet_pool(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train-00000-of-00001.parquet"
    # a struct column, as the hub stores query_metadata; a row without level has level null
    pq.write_table(pa.Table.from_pylist([{**r, "query_metadata": {"level": r["query_metadata"].get("level")}}
                                         for r in HAND_ROWS]), path)
    questions = load_pool_questions(path, level=2, sample_size=4)
    assert [(q.query_id, q.row) for q in questions] == [("q1", 0), ("q3", 3), ("q4", 5)]
    # the release groups a null level on its own: it is no question of any level
    assert [q.query_id for q in load_pool_questions(path, level=NO_LEVEL)] == []


def test_hub_id_takes_the_same_path_as_a_local_file(tmp_path, monkeypatch):
    """``dart`` streams the hub's train split; the rows go through the same selection."""
    calls = []

    def load_dataset(name, split=None, streaming=False):
        calls.append((name, split, streaming))
        return iter([dict(r) for r in HAND_ROWS * 3])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    local = load_questions(str(write_jsonl(tmp_path / "pool.jsonl", HAND_ROWS * 3)), difficulty=2)
    from_hub = load_questions("dart", difficulty=2)
    assert calls == [("hkust-nlp/dart-math-pool-math", "train", True)]
    assert from_hub == local
    assert [q.id for q in from_hub] == ["dart-q1", "dart-q3", "dart-q4", "dart-q5", "dart-q2"]


def release_sample_dataset(dataset, sample_size, level):
    """The release's ``sample_dataset`` on a ``datasets.Dataset``, written out independently:
    row indices of ``level`` in order, the first ``sample_size`` of them, then the first row of
    each ``query_id``."""
    indices = [i for i, data in enumerate(dataset) if data["query_metadata"].get("level", 0) == level]
    kept, seen = [], set()
    for i in sorted(indices[:sample_size]):
        if dataset[i]["query_id"] not in seen:
            seen.add(dataset[i]["query_id"])
            kept.append(i)
    return [dataset[i] for i in kept], kept


def test_hub_path_with_the_real_datasets_library_selects_what_the_release_selects(tmp_path, monkeypatch):
    """``dart`` through the real ``datasets`` library (the hub id redirected to a local snapshot in
    the pool's parquet layout): our streaming read selects the questions the release's
    ``load_dataset(name)["train"]`` + ``sample_dataset`` select, in the same order. Level 2 has
    more than 2000 rows and many repeated query ids, so both the cut and the de-duplication act."""
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = __import__("random").Random(5)
    rows = [{"query": f"question {k}?", "gt_ans": str(k % 97), "query_id": f"id{k}",
             "query_metadata": {"level": rng.choice([1, 2, 2, 2, 3, 4, 5])}}
            for k in (rng.randrange(2500) for _ in range(6000))]
    folder = tmp_path / "snapshot"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:3500]), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3500:]), folder / "data" / "train-00001-of-00002.parquet")

    real_load = datasets.load_dataset

    def load_dataset(name, *args, **kwargs):
        assert name == "hkust-nlp/dart-math-pool-math"
        return real_load(str(folder), *args, cache_dir=str(tmp_path / "cache"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    ours = load_questions("dart", difficulty=2)
    release, indices = release_sample_dataset(load_dataset("hkust-nlp/dart-math-pool-math")["train"], 2000, 2)
    assert 1000 < len(release) < 2000  # the cut at 2000 rows, then duplicates removed
    assert [(q.id, q.question, q.answer, q.level) for q in ours] == [
        (f"dart-{r['query_id']}", r["query"], r["gt_ans"], 2) for r in release]
    assert [q.extra["pool_row"] for q in ours] == indices


def test_unreachable_hub_falls_back_to_math_with_a_notice(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    monkeypatch.setattr(ds, "_NOTICES_SHOWN", set())
    questions = load_questions("dart", difficulty=5)
    assert questions == load_questions("math", difficulty=5, limit=2000)
    err = capsys.readouterr().err
    assert "datasets" in err and "using MATH train problems" in err


def test_a_hub_stream_that_breaks_midway_is_an_error_not_a_fallback(monkeypatch):
    def rows():
        yield from HAND_ROWS[:3]
        raise ConnectionError("connection reset")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows()))
    with pytest.raises(PolarError, match="failed after 3 rows .*connection reset"):
        load_questions("dart", difficulty=2)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: (_ for _ in ()).throw(OSError("no network"))))
    with pytest.raises(PoolUnavailable, match="OSError: no network"):
        list(pool_rows("hkust-nlp/dart-math-pool-math"))


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"query": "x", "gt_ans": "1", "query_id": "b"}, r"row 1 \(line 2\): field 'query_metadata' is missing"),
        ({**row("b", 2), "query_metadata": [2]}, r"row 1 \(line 2\): field 'query_metadata' must be an object"),
        ({**row("b", 2), "query_metadata": "level two"}, r"field 'query_metadata' is text that is not a JSON object"),
        ({**row("b", 2), "query_metadata": {"level": [2]}}, r"row 1 \(line 2\): field 'query_metadata.level' must be an integer"),
        ({k: v for k, v in row("b", 2).items() if k != "query_id"}, r"row 1 \(line 2\): field 'query_id' is missing"),
        ({k: v for k, v in row("b", 2).items() if k != "query"}, r"row 1 \(line 2\): field 'query' is missing"),
        ({**row("b", 2), "query": "  "}, r"row 1 \(line 2\): field 'query' must be non-empty text"),
        ({k: v for k, v in row("b", 2).items() if k != "gt_ans"}, r"row 1 \(line 2\): field 'gt_ans' is missing"),
        ({**row("b", 2), "gt_ans": {"x": 1}}, r"field 'gt_ans' must be text or a number"),
        ({**row("b", 2), "query_id": [1]}, r"field 'query_id' must be text or an integer"),
        (["not", "an", "object"], r"row 1 \(line 2\): a pool row must be an object"),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, bad_row, message):
    pool = write_jsonl(tmp_path / "pool.jsonl", [row("a", 2), bad_row, row("c", 2)])
    with pytest.raises(DataError, match=message) as err:
        load_questions(str(pool), difficulty=2)
    assert str(pool) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_files_are_one_line_errors(tmp_path):
    broken = tmp_path / "pool.jsonl"
    broken.write_text(json.dumps(row("a", 2)) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"pool.jsonl: line 3: invalid JSON"):
        load_questions(str(broken), difficulty=2)
    not_rows = tmp_path / "pool.json"
    not_rows.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="expected a list of pool rows"):
        load_questions(str(not_rows), difficulty=2)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        load_questions(str(binary), difficulty=2)
    fake_parquet = tmp_path / "fake.parquet"
    fake_parquet.write_text("this is not parquet")
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError, match="fake.parquet: not a readable parquet file"):
        load_questions(str(fake_parquet), difficulty=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .jsonl, .json, .parquet files"):
        load_questions(str(empty), difficulty=2)


def test_rows_after_the_selection_are_not_read(tmp_path):
    """Selection stops at the sample_size-th row of the level, as a stream must."""
    seen = []

    def rows():
        for i, r in enumerate(HAND_ROWS):
            seen.append(i)
            yield f"rows: row {i}", r

    select_questions(rows(), level=2, sample_size=4)
    assert seen == [0, 1, 2, 3, 4, 5]


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample_size"):
        select_questions([], level=1, sample_size=0)
    with pytest.raises(ValueError, match="local DART-Math pool file"):
        load_questions("no-such-pool.jsonl")


def test_search_cli_reads_a_local_pool_file(tiny_model_dir, tmp_path):
    from polar.cli import main

    pool = write_jsonl(tmp_path / "pool.jsonl", [
        row("p1", 3, query="What is 2+2?", gt="4"), row("p1", 3), row("p2", 1),
        row("p3", 3, query="What is 3+3?", gt="6"), row("p4", 3, query="What is 1+1?", gt="2"),
    ])
    out = tmp_path / "out"
    code = main(["search", "--model_path", str(tiny_model_dir), "--dataset", str(pool), "--target_diff", "3",
                 "--limit", "2", "--num_simulations", "1", "--max_new_tokens", "2", "--prompt_style", "plain",
                 "--device", "cpu", "--no_progress", "--out", str(out)])
    assert code == 0
    merged = json.loads((out / "tiny-llama" / "dart-math-diff-3" / "merged_mcts_samples.json").read_text())
    assert [(s["id"], s["question"], s["gt_ans"]) for s in merged["samples"]] == [
        ("dart-p1", "What is 2+2?", "4"), ("dart-p3", "What is 3+3?", "6")]
    assert merged["metadata"]["settings"]["dataset"] == str(pool)


def test_search_cli_rejects_an_unknown_dataset(capsys):
    from polar.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--dataset", "no-such-pool.jsonl", "--out", "unused"])
    assert exit_info.value.code == 2
    assert "neither one of dart, math" in capsys.readouterr().err
