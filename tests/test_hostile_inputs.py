"""Hostile inputs, through the real entry points (``polar ...``, ``run_polar.py``): each case gets a
bounded time and either a one-line error or a correct verdict, never a traceback, a hang, a
silent "ok" or lost results.

Covered: results of other settings are never overwritten silently and one shard has one writer
(two real processes); the headline of an evaluation leads with live metrics even on a tampered
supervision file; ``polar validate`` rejects programs that cannot run, fast and in bounded
memory; every numeric flag refuses values with no meaning.
"""

from __future__ import annotations

import json
import random
import re
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from polar.cli import build_parser as polar_parser
from polar.cli import main as polar_main
from polar.release_cli import build_parser as release_parser
from polar.release_cli import main as release_main
from polar.search import MERGED_NAME

REPO = Path(__file__).resolve().parents[1]
TASK = Path("tiny-llama") / "dart-math-diff-1"


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float


def run_process(*argv, entry: str = "polar", timeout: float = 60, memory_gb: float | None = None,
                env: dict | None = None) -> Outcome:
    """Run a real CLI process; ``memory_gb`` caps its address space (an allocation that grows with
    a hostile number then fails fast instead of exhausting the machine)."""
    program = ["-m", "polar"] if entry == "polar" else [str(REPO / entry)]

    def limit() -> None:
        if memory_gb is not None:
            cap = int(memory_gb * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.perf_counter()
    done = subprocess.run([sys.executable, *program, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, cwd=REPO, env=env)
    return Outcome(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)


def call(main, argv, capsys) -> Outcome:
    """Run an entry point in this process (argparse errors exit through SystemExit)."""
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err, time.perf_counter() - start)


def assert_one_line_error(outcome: Outcome, *fragments: str, bound: float = 30) -> str:
    """Exit status 2, no traceback, exactly one line on stderr holding every fragment."""
    assert outcome.seconds < bound, f"took {outcome.seconds:.1f} s"
    assert "Traceback" not in outcome.err and "Traceback" not in outcome.out
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    assert outcome.code == 2, outcome.err
    assert len(lines) == 1, outcome.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- defect 5: no silent overwrite


def search_args(model, out, *extra):
    return ["search", "--model_path", model, "--dataset", "math", "--target_diff", 1, "--limit", 3,
            "--num_simulations", 3, "--max_new_tokens", 3, "--prompt_style", "plain", "--device", "cpu",
            "--no_progress", "--out", out, *extra]


def test_search_over_results_of_other_settings_refuses_unless_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    task = out / TASK
    assert call(polar_main, search_args(tiny_model_dir, out), capsys).code == 0
    merged = (task / MERGED_NAME).read_bytes()
    shard = task / "shards" / "shard-00000-of-00001.json"

    # another --num_simulations into the same --out: one line naming the file and the setting
    other = call(polar_main, search_args(tiny_model_dir, out, "--num_simulations", 4), capsys)
    assert_one_line_error(other, str(shard), "search.num_simulations: 3 there, 4 now", "--overwrite")
    # another shard count writes other files, but the results there are of other settings too
    sharded = call(polar_main, search_args(tiny_model_dir, out, "--num_simulations", 4, "--shard", "0/2"), capsys)
    assert_one_line_error(sharded, "search.num_simulations: 3 there, 4 now")
    assert not (task / "shards" / "shard-00000-of-00002.json").exists()
    assert (task / MERGED_NAME).read_bytes() == merged  # nothing was lost

    # the same settings resume (nothing to do) and leave the results as they were
    again = call(polar_main, search_args(tiny_model_dir, out), capsys)
    assert again.code == 0
    assert json.loads((task / MERGED_NAME).read_text())["samples"] == json.loads(merged)["samples"]

    # --overwrite replaces them and says so
    replaced = call(polar_main, search_args(tiny_model_dir, out, "--num_simulations", 4, "--overwrite"), capsys)
    assert replaced.code == 0 and "Traceback" not in replaced.err
    assert "--overwrite: removed" in replaced.err and "search.num_simulations: 3 there, 4 now" in replaced.err
    data = json.loads((task / MERGED_NAME).read_text())
    assert data["metadata"]["settings"]["search"]["num_simulations"] == 4
    assert all(s["search"]["programs_evaluated"] == 5 for s in data["samples"])
    assert [p.name for p in (task / "shards").iterdir()] == ["shard-00000-of-00001.json"]


def test_a_merged_file_not_written_by_search_is_not_overwritten(tiny_model_dir, tmp_path, capsys):
    task = tmp_path / "out" / TASK
    task.mkdir(parents=True)
    theirs = json.dumps({"samples": [{"question": "q", "gt_ans": "1", "final_valid_transitions": [[0, 1]]}]})
    (task / MERGED_NAME).write_text(theirs)
    outcome = call(polar_main, search_args(tiny_model_dir, tmp_path / "out"), capsys)
    assert_one_line_error(outcome, str(task / MERGED_NAME), "no settings recorded")
    assert (task / MERGED_NAME).read_text() == theirs


def test_polar_merge_refuses_to_replace_a_merged_file_of_other_settings(tiny_model_dir, tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert call(polar_main, search_args(tiny_model_dir, first), capsys).code == 0
    assert call(polar_main, search_args(tiny_model_dir, second, "--num_simulations", 4), capsys).code == 0
    # shards of the second run copied over the first run's folder (as after an rsync)
    for shard in (first / TASK / "shards").iterdir():
        shard.unlink()
    for shard in (second / TASK / "shards").iterdir():
        (first / TASK / "shards" / shard.name).write_bytes(shard.read_bytes())
    before = (first / TASK / MERGED_NAME).read_bytes()
    merge = ["merge", "--out", first, "--model_path", tiny_model_dir, "--target_diff", 1]
    assert_one_line_error(call(polar_main, merge, capsys), MERGED_NAME, "search.num_simulations: 3 there, 4 now")
    assert (first / TASK / MERGED_NAME).read_bytes() == before
    assert call(polar_main, [*merge, "--overwrite"], capsys).code == 0
    merged = json.loads((first / TASK / MERGED_NAME).read_text())
    assert merged["metadata"]["resume_key"]["search"]["num_simulations"] == 4


HOLDER = """
import sys, time
from pathlib import Path
import polar.scoring
go = Path(sys.argv[1])
original = polar.scoring.ProgramScorer.score
def score(self, *args, **kwargs):
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:  # hold the shard until told to go on
        time.sleep(0.05)
    return original(self, *args, **kwargs)
polar.scoring.ProgramScorer.score = score
from polar.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


@pytest.mark.slow  # two interpreters import torch and load a model: ~20-35 s on a busy 2-core machine
def test_two_concurrent_searches_of_one_shard_one_is_refused(tiny_model_dir, tmp_path):
    """Two real processes: the second finds the first's lock, names it in one line, and the
    first finishes with complete results."""
    out = tmp_path / "out"
    go = tmp_path / "go"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    argv = [str(a) for a in search_args(tiny_model_dir, out)]
    first = subprocess.Popen([sys.executable, str(script), str(go), *argv], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / TASK / "shards" / "shard-00000-of-00001.json.lock"
    try:
        deadline = time.monotonic() + 90
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.exists(), first.stderr.read() if first.poll() is not None else "no lock after 90 s"
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname() and holder["started"]

        second = run_process(*argv[:-1], out, timeout=90)
        assert_one_line_error(second, f"is being written by pid {first.pid} on {socket.gethostname()}",
                              str(lock), bound=90)
    finally:
        go.write_text("go")
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "Traceback" not in stderr and not lock.exists()
    merged = json.loads((out / TASK / MERGED_NAME).read_text())
    assert len(merged["samples"]) == 3 and all(s["search"]["programs_evaluated"] == 4 for s in merged["samples"])


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(path: Path, pid: int, host: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "2020-01-01T00:00:00+00:00"}))


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    lock = out / TASK / "shards" / "shard-00000-of-00001.json.lock"
    pid = dead_pid()
    write_lock(lock, pid, socket.gethostname())
    outcome = call(polar_main, search_args(tiny_model_dir, out), capsys)
    assert outcome.code == 0 and "Traceback" not in outcome.err
    assert f"taking over the stale lock {lock} left by pid {pid}" in outcome.err
    assert not lock.exists() and len(json.loads((out / TASK / MERGED_NAME).read_text())["samples"]) == 3


def test_a_lock_held_on_another_host_is_an_error(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    lock = out / TASK / "shards" / "shard-00000-of-00001.json.lock"
    write_lock(lock, 4242, "some-other-host")
    outcome = call(polar_main, search_args(tiny_model_dir, out), capsys)
    assert_one_line_error(outcome, "pid 4242 on some-other-host", "another host", str(lock))
    assert lock.exists() and not (out / TASK / "shards" / "shard-00000-of-00001.json").exists()


RACER = """
import sys, time
from pathlib import Path
from polar import locks
go, target = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    lock = locks.acquire(target, log=lambda message: print("log:", message))
except locks.LockedError:
    print("refused")
else:
    print("acquired")
    time.sleep(1.5)
    locks.release(lock)
"""


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_racing_processes_get_the_lock_exactly_once(tmp_path, stale):
    """Six processes released at the same instant: one owner, five one-line refusals; with a
    stale lock in place, exactly one of them takes it over."""
    target = tmp_path / "shard.json"
    if stale:
        write_lock(Path(f"{target}.lock"), dead_pid(), socket.gethostname())
    script, go = tmp_path / "racer.py", tmp_path / "go"
    script.write_text(RACER)
    racers = [subprocess.Popen([sys.executable, str(script), str(go), str(target)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    time.sleep(2.0)  # let every interpreter start and wait for the signal
    go.write_text("go")
    results = [r.communicate(timeout=60) for r in racers]
    outs = [out for out, _ in results]
    assert all(r.returncode == 0 for r in racers), [err for _, err in results]
    assert sum("acquired" in out for out in outs) == 1
    assert sum("refused" in out for out in outs) == 5
    assert sum("taking over the stale lock" in out for out in outs) == (1 if stale else 0)
    assert not Path(f"{target}.lock").exists()


# --------------------------------------------------------------------------- defect 6: live metrics first


def write_tiny_supervision(data_root: Path, model: Path, n: int = 28) -> Path:
    samples = [{
        "question": f"What is {i} plus 1?", "gt_ans": str(i + 1), "initial_score": 0.0,
        "final_valid_transitions": [[0, 1, 2, 3, 4, 5], [0, 1, 2, 4, 5]], "final_invalid_transitions": [[0, 1]],
    } for i in range(n)]
    path = data_root / model.name / "dart-math-diff-1" / MERGED_NAME
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"samples": samples}))
    return path


def test_a_tampered_supervision_file_cannot_lead_the_evaluation(tiny_model_dir, tmp_path, capsys):
    """Every program the predictor proposes is labelled valid in the file, and the gold answers
    are ones the model cannot produce: the release's cached pass@k reads 1.0, the live numbers
    0.0. The printed line and the JSON summary lead with the live numbers and label the cached
    one."""
    supervision = write_tiny_supervision(tmp_path / "data", tiny_model_dir)
    argv = ["--target_diff", 1, "--model_path", tiny_model_dir, "--data_root", tmp_path / "data",
            "--save_dir", tmp_path / "save", "--encoder", "hash", "--num_epochs", 1, "--batch_size", 8,
            "--polar_d_model", 16, "--split_sizes", "20,4", "--num_samples", 4, "--top_k_paths", 3,
            "--max_new_tokens", 3, "--prompt_style", "plain", "--device", "cpu", "--no_progress"]
    assert call(release_main, argv, capsys).code == 0
    (report_path,) = (tmp_path / "save" / "eval").rglob("eval_*.json")
    proposed = json.loads(report_path.read_text())["per_question"]

    data = json.loads(supervision.read_text())
    for sample, question in zip(data["samples"][24:], proposed):
        sample["final_valid_transitions"] = question["programs"]  # tampered: all "valid"
        sample["gt_ans"] = "no number at all"                      # and no live run can be right
    supervision.write_text(json.dumps(data))

    outcome = call(release_main, [*argv, "--eval"], capsys)
    assert outcome.code == 0 and "Traceback" not in outcome.err
    report = json.loads(report_path.read_text())
    k = report["metrics"]["overall"]["k"]
    (line,) = [ln for ln in outcome.out.splitlines() if ln.startswith("overall:")]
    assert line.startswith(f"overall: n=4 | live: pass@{k}=0.000 pass@1=0.000 vote@{k}=0.000")
    assert f"| pass@{k} (from search labels, cached for 100% of programs)=1.000" in line
    assert "100% of questions correct only by a cached label" in line

    assert list(report)[0] == "summary"
    summary = report["summary"]
    assert summary["headline"] == line
    assert summary["live"]["pass_at_k_live"] == 0.0 and summary["live"]["pass_at_1"] == 0.0
    assert summary["release_pass_at_k"] == {"value": 1.0, "verdicts": "cached search labels where available",
                                            "cache_hit_rate": 1.0, "questions_only_from_cache": 1.0}
    keys = list(report["metrics"]["overall"])
    assert keys.index("pass_at_k_live") < keys.index("pass_at_1") < keys.index("pass_at_k")

    live = call(release_main, [*argv, "--eval", "--no_trust_valid_cache"], capsys)
    (line,) = [ln for ln in live.out.splitlines() if ln.startswith("overall:")]
    assert line.endswith(f"| release pass@{k} = live (no cached label used)")
    reports = [json.loads(p.read_text()) for p in (tmp_path / "save" / "eval").rglob("eval_*.json")]
    (untrusted,) = [r for r in reports if not r["settings"]["trust_valid_cache"]]  # a report of its own
    assert untrusted["metrics"]["overall"]["pass_at_k"] == 0.0


# --------------------------------------------------------------------------- defect 7: polar validate


FULL = list(range(30))


def supervision_file(path: Path, programs: list[list[int]], metadata: dict | None = None,
                     full_program: bool = True) -> Path:
    samples = [{"question": "q", "gt_ans": "1", "final_valid_transitions": [FULL] if full_program else [],
                "final_invalid_transitions": []} for _ in range(3)]
    samples[2]["final_valid_transitions"] += programs
    path.write_text(json.dumps({"samples": samples, **({"metadata": metadata} if metadata else {})}))
    return path


def validate(*argv) -> Outcome:
    return run_process("validate", *argv, timeout=30, memory_gb=1)


def test_validate_rejects_an_index_beyond_the_recorded_depth(tmp_path):
    path = supervision_file(tmp_path / "f.json", [[0, 1, 99]], {"settings": {"num_layers": 30}})
    assert_one_line_error(validate(path), f"{path}: sample 2: final_valid_transitions[1][2] is layer 99",
                          "the model has 30 layers", "metadata.settings.num_layers")


def test_validate_rejects_a_layer_run_three_times(tmp_path):
    path = supervision_file(tmp_path / "f.json", [[0, 1, 2, 2, 2, *range(3, 30)]], {"settings": {"num_layers": 30}})
    assert_one_line_error(validate(path), "sample 2: final_valid_transitions[1] runs layer 2 3 times")


def test_validate_without_metadata_infers_the_depth_from_the_full_program(tmp_path):
    path = supervision_file(tmp_path / "f.json", [[0, 1, 99]])
    assert_one_line_error(validate(path), "final_valid_transitions[1][2] is layer 99", "30 layers",
                          "full-depth program 0-29, present in every sample")


def test_validate_without_any_depth_says_the_depth_was_guessed(tmp_path):
    path = supervision_file(tmp_path / "f.json", [[0, 1, 99]], full_program=False)
    outcome = validate(path)
    assert outcome.code == 0 and "Traceback" not in outcome.err
    assert f"{path}: ok, but layer indices unchecked (model depth unknown)" in outcome.out
    assert "num_layers_from: the highest layer index 99 + 1 (sample 2 final_valid_transitions[0]" in outcome.out
    # given the depth, the same file is an error
    assert_one_line_error(validate(path, "--num_layers", 30), "is layer 99", "--num_layers")


def test_validate_depth_from_a_model_config_and_conflicting_depths(tmp_path, tiny_model_dir, capsys):
    path = supervision_file(tmp_path / "f.json", [[0, 1, 99]], {"settings": {"num_layers": 30}})
    assert_one_line_error(call(polar_main, ["validate", path, "--model_path", tiny_model_dir], capsys),
                          "metadata.settings.num_layers says 30 layers", f"the config of {tiny_model_dir} says 6")
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"samples": [{"question": "q", "gt_ans": "1",
                                              "final_valid_transitions": [[0, 1, 2, 3, 4, 5], [0, 1, 3, 4, 5]]}]}))
    outcome = call(polar_main, ["validate", small, "--model_path", tiny_model_dir], capsys)
    assert outcome.code == 0 and f"num_layers_from: the config of {tiny_model_dir}" in outcome.out


@pytest.mark.parametrize("case", ["index_1e9", "num_layers_1e9", "num_layers_int_1e9", "nesting_100k"])
def test_validate_huge_numbers_and_deep_nesting_fail_fast_in_bounded_memory(tmp_path, case):
    path = tmp_path / f"{case}.json"
    sample = {"question": "q", "gt_ans": "1", "final_valid_transitions": [[0, 1]]}
    if case == "index_1e9":
        path.write_text(json.dumps([{**sample, "final_valid_transitions": [[0, 1000000000]]}]))
        expected = ["final_valid_transitions[0][1] is layer 1000000000, beyond any model"]
    elif case == "num_layers_1e9":
        path.write_text('{"metadata": {"settings": {"num_layers": 1e9}}, "samples": [%s]}' % json.dumps(sample))
        expected = ["metadata.settings.num_layers must be a whole number", "1000000000.0"]
    elif case == "num_layers_int_1e9":
        path.write_text(json.dumps({"metadata": {"num_layers": 10**9}, "samples": [sample]}))
        expected = ["metadata.num_layers must be a whole number of layers in 1-10000"]
    else:
        path.write_text("[" * 100_000 + "]" * 100_000)
        expected = ["JSON nested too deeply"]
    assert_one_line_error(validate(path), str(path), *expected, bound=10)


SAMPLE = '{"question": "q", "gt_ans": "1", "final_valid_transitions": [[0, 1]]}'
MALFORMED = {  # file text -> what the one error line must say (after the file name)
    "negative index": (SAMPLE.replace("[[0, 1]]", "[[0, -1]]"), "final_valid_transitions[0] must be a non-empty list"),
    "float index": (SAMPLE.replace("[[0, 1]]", "[[0, 1.0]]"), "final_valid_transitions[0] must be a non-empty list"),
    "bool index": (SAMPLE.replace("[[0, 1]]", "[[0, 1], [0, true]]"), "final_valid_transitions[1] must be"),
    "string index": (SAMPLE.replace("[[0, 1]]", '[[0, "1"]]'), "final_valid_transitions[0] must be"),
    "null index": (SAMPLE.replace("[[0, 1]]", "[[0, null]]"), "final_valid_transitions[0] must be"),
    "nested list": (SAMPLE.replace("[[0, 1]]", "[[0, [1]]]"), "final_valid_transitions[0] must be"),
    "empty program": (SAMPLE.replace("[[0, 1]]", "[[0, 1], []]"), "final_valid_transitions[1] must be"),
    "a program is not a list": (SAMPLE.replace("[[0, 1]]", "[[0, 1], 5]"), "final_valid_transitions[1] must be"),
    "NaN score": (SAMPLE[:-1] + ', "initial_score": NaN}', "initial_score must be a finite number, got nan"),
    "boolean score": (SAMPLE[:-1] + ', "initial_score": true}', "initial_score must be a number, got bool"),
    "Infinity answer": (SAMPLE.replace('"1"', "Infinity"), "gt_ans must be text, got inf"),
    "NaN question": (SAMPLE.replace('"q"', "NaN"), "question must be text, got nan"),
    "empty question": (SAMPLE.replace('"q"', '"  "'), "sample 0: question is empty"),
    "empty answer": (SAMPLE.replace('"1"', '""'), "sample 0: gt_ans is empty"),
    "duplicate field": (SAMPLE[:-1] + ', "final_valid_transitions": [[0, 5]]}',
                        "key 'final_valid_transitions' appears twice in one object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_sample_is_named_by_validate_and_training(tmp_path, capsys, case):
    text, expected = MALFORMED[case]
    path = tmp_path / "f.json"
    path.write_text('{"metadata": {"num_layers": 6}, "samples": [%s]}' % text)
    assert_one_line_error(call(polar_main, ["validate", path], capsys), str(path), expected, bound=10)
    from polar.data import SupervisionError, load_samples

    with pytest.raises(SupervisionError, match=re.escape(expected)):
        load_samples(path)  # what training reads


def test_duplicate_question_keys_would_drop_a_sample_and_are_refused(tmp_path, capsys):
    path = tmp_path / "f.json"
    path.write_text('{"q1": %s, "q1": %s}' % (SAMPLE, SAMPLE.replace('"q"', '"other"')))
    assert_one_line_error(call(polar_main, ["validate", path], capsys), str(path), "key 'q1' appears twice")


def test_a_byte_order_mark_is_read_as_utf8(tmp_path, capsys):
    path = tmp_path / "f.json"
    path.write_bytes(b"\xef\xbb\xbf" + ('{"metadata": {"num_layers": 6}, "samples": [%s]}' % SAMPLE).encode())
    outcome = call(polar_main, ["validate", path], capsys)
    assert outcome.code == 0 and f"{path}: ok" in outcome.out


def test_bytes_that_are_not_utf8_are_named(tmp_path, capsys):
    path = tmp_path / "f.json"
    path.write_bytes(('{"samples": [%s]}' % SAMPLE.replace('"q"', '"caf_"')).encode().replace(b"_", b"\xe9"))
    assert_one_line_error(call(polar_main, ["validate", path], capsys), str(path), "not UTF-8 text (byte")


def test_unreadable_paths_are_one_line_errors(tmp_path, capsys, monkeypatch):
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    folder = tmp_path / "folder.json"
    folder.mkdir()
    for path, expected in ((loop, "cannot be read (Too many levels of symbolic links)"),
                           (folder, "is a directory"), (tmp_path / "missing.json", "file not found")):
        assert_one_line_error(call(polar_main, ["validate", path], capsys), str(path), expected)
    # chmod 000 does not stop root, so the refusal is simulated at the read
    locked = tmp_path / "locked.json"
    locked.write_text("{}")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    assert_one_line_error(call(polar_main, ["validate", locked], capsys), str(locked), "cannot be read (Permission denied)")


POOL_ROW = '{"query": "What is 1+1?", "gt_ans": "2", "query_id": %d, "query_metadata": {"level": 1}}'
POOLS = {  # file name, text -> the one error line's words
    "bad line in the middle": ("pool.jsonl", "\n".join([POOL_ROW % 0, POOL_ROW % 1, '{"query": broken', POOL_ROW % 2]),
                               "pool.jsonl: line 3: invalid JSON"),
    "deep nesting in a line": ("pool.jsonl", POOL_ROW % 0 + "\n" + "[" * 100_000 + "]" * 100_000,
                               "pool.jsonl: line 2: JSON nested too deeply"),
    "deep nesting in a .json": ("pool.json", "[" * 100_000 + "]" * 100_000, "pool.json: JSON nested too deeply"),
    "empty": ("pool.jsonl", "", "argument --dataset", "holds no questions of difficulty 1"),
}


@pytest.mark.parametrize("case", sorted(POOLS))
def test_a_bad_question_pool_is_named_before_the_model_loads(tmp_path, capsys, case):
    name, text, *words = POOLS[case]
    pool = tmp_path / name
    pool.write_text(text)
    outcome = call(polar_main, ["search", "--dataset", pool, "--target_diff", 1, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(outcome, *words, bound=10)


def test_a_question_pool_with_a_byte_order_mark_is_read(tmp_path):
    from polar.io import iter_jsonl

    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b"\xef\xbb\xbf" + (POOL_ROW % 7).encode() + b"\n")
    assert list(iter_jsonl(pool)) == [(1, json.loads(POOL_ROW % 7))]


def searchlike_paths(rng: random.Random, count: int, depth: int = 30) -> list[list[int]]:
    """Programs as search writes them: the full program after a few skips and block repeats, no
    layer more than twice."""
    out: list[list[int]] = []
    while len(out) < count:
        program = list(range(depth))
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(program))
            if rng.random() < 0.5 and len(program) > depth // 2:
                del program[i]
            else:
                size = rng.randint(1, 4)
                program = program[:i + size] + program[i:i + size] + program[i + size:]
        if max(program.count(layer) for layer in program) <= 2:
            out.append(program)
    return out


def test_validating_20000_paths_takes_seconds(tmp_path):
    """20,000 valid + 20,000 invalid search-like paths (5 MB). This took 80 s (a full D x len
    table per path); the bound leaves room for a busy machine."""
    rng = random.Random(0)
    samples = [{"question": f"q{i}", "gt_ans": "1", "initial_score": 0.0,
                "final_valid_transitions": searchlike_paths(rng, 10),
                "final_invalid_transitions": searchlike_paths(rng, 10)} for i in range(2000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"metadata": {"settings": {"num_layers": 30}}, "samples": samples}))
    outcome = run_process("validate", path, timeout=120)
    assert outcome.code == 0 and "Traceback" not in outcome.err
    assert outcome.seconds < 30, f"validate took {outcome.seconds:.1f} s"
    assert "valid_paths: 20000" in outcome.out and "invalid_paths: 20000" in outcome.out
    # the parses themselves equal the full-table DP's: tests/test_programs.py checks that
    unparseable = int(outcome.out.split("unparseable_valid_paths: ")[1].split()[0])
    assert 0 < unparseable < 20000


def test_validate_stops_at_garbage_paths_fast(tmp_path):
    rng = random.Random(1)
    samples = [{"question": "q", "gt_ans": "1", "final_valid_transitions": [
        [rng.randrange(30) for _ in range(rng.randint(17, 34))] for _ in range(10)]} for _ in range(2000)]
    path = tmp_path / "garbage.json"
    path.write_text(json.dumps({"metadata": {"settings": {"num_layers": 30}}, "samples": samples}))
    assert_one_line_error(run_process("validate", path, timeout=60),
                          "times; a program runs a layer at most 2 times", "more programs that cannot run", bound=20)


def test_training_skips_and_counts_programs_that_cannot_run():
    """The training side of the same programs: skipped and counted, not fatal."""
    from polar.data import Sample
    from polar.train import TrainConfig, build_examples

    samples = [Sample(0, "0", "q", "1", valid_paths=[list(range(6)), [0, 1, 99], [0, 1, 1, 1, 2, 3, 4, 5]])]
    examples, stats = build_examples(samples, 6, TrainConfig(), random.Random(0))
    assert stats.unparseable == 2 and len(examples) == 1


# --------------------------------------------------------------------------- defect 8: meaningless numbers


def test_every_numeric_flag_has_a_checked_type():
    """No command or run_polar.py flag parses a number with a bare int/float (which accepts
    -5, 0, nan and inf): each uses a range-checked type from polar.flags or a choice list."""
    parsers = {"run_polar.py": release_parser()}
    sub = next(a for a in polar_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    parsers.update({f"polar {name}": p for name, p in sub.choices.items()})
    bare = [f"{name} {action.option_strings[0]}" for name, parser in parsers.items() for action in parser._actions
            if action.type in (int, float) and not action.choices]
    assert bare == []
    assert {"polar search", "polar merge", "polar run", "polar validate", "polar demo", "polar train",
            "polar eval"} <= set(parsers)


REFUSED = {
    "search": [("--num_simulations", "-5"), ("--num_simulations", "0"), ("--max_new_tokens", "-3"),
               ("--limit", "0"), ("--offset", "-1"), ("--time_limit", "-5"), ("--time_limit", "0"),
               ("--fewshot", "-1"), ("--batch_size", "0"), ("--max_active", "0"), ("--seed", "-1"),
               ("--min_length", "0"), ("--max_length", "-2"), ("--epsilon", "1.5"), ("--length_penalty", "nan"),
               ("--exploration", "-1"), ("--widening", "inf"), ("--target_diff", "9")],
    "merge": [("--num_shards", "0"), ("--target_diff", "0")],
    "run": [("--fewshot", "-2"), ("--max_new_tokens", "0")],
    "validate": [("--num_layers", "0"), ("--num_layers", "1e9"), ("--num_layers", "100000")],
    "demo": [("--difficulty", "6"), ("--questions", "1"), ("--validation", "-1"), ("--test_questions", "0"),
             ("--simulations", "0"), ("--fewshot", "-1"), ("--max_new_tokens", "0"), ("--epochs", "0"),
             ("--top_k", "0"), ("--batch_size", "0"), ("--seed", "-3"), ("--threads", "0")],
    "run_polar.py": [("--num_epochs", "0"), ("--batch_size", "0"), ("--learning_rate", "0"),
                     ("--learning_rate", "-1e-4"), ("--learning_rate", "nan"), ("--seed", "-1"),
                     ("--max_paths_per_sample", "0"), ("--max_total_examples", "0"), ("--max_val_examples", "0"),
                     ("--polar_d_model", "0"), ("--polar_heads", "0"), ("--polar_layers", "-1"),
                     ("--lenpref_beta", "inf"), ("--keep_original_prob", "nan"), ("--original_path_weight", "inf"),
                     ("--anti_original_lambda", "nan"), ("--max_new_tokens", "-3"), ("--num_samples", "-1"),
                     ("--eval_limit", "0"), ("--seg_threshold", "1.5"), ("--beam_size", "0"), ("--top_k_ops", "0"),
                     ("--top_k_paths", "0"), ("--len_penalty", "nan"), ("--warmup_steps", "1.5"),
                     ("--nan_lr_backoff", "2"), ("--min_lr", "nan"), ("--grad_clip_norm", "inf"),
                     ("--optimizer_eps", "-1"), ("--weight_decay", "-0.1"), ("--encoder_layer", "-1"),
                     ("--fewshot", "-1"), ("--eval_batch_size", "0"), ("--target_diff", "6")],
}
REQUIRED = {"search": ["--out", "x"], "merge": ["--out", "x"], "run": ["--question", "q"], "validate": ["f.json"],
            "demo": [], "run_polar.py": ["--target_diff", "1"]}
CASES = [(command, flag, value) for command, pairs in REFUSED.items() for flag, value in pairs]


@pytest.mark.parametrize("command,flag,value", CASES, ids=[f"{c}{f}={v}" for c, f, v in CASES])
def test_a_meaningless_number_is_a_one_line_error(command, flag, value, capsys):
    base = [] if command == "run_polar.py" else [command]
    required = [a for a in REQUIRED[command] if not (flag == "--target_diff" and a in ("--target_diff", "1"))]
    main = release_main if command == "run_polar.py" else polar_main
    outcome = call(main, [*base, *required, f"{flag}={value}"], capsys)
    assert_one_line_error(outcome, f"argument {flag}", value, "(see", bound=5)


DEVICE_CASES = [(command, value) for command in ("search", "run", "demo", "run_polar.py")
                for value in ("nonsense", "mps", "cuda:99")]


@pytest.mark.parametrize("command,value", DEVICE_CASES)
def test_a_device_this_machine_lacks_is_a_one_line_error(command, value, capsys):
    # was: a RuntimeError / AssertionError traceback after the model had loaded
    base = [] if command == "run_polar.py" else [command]
    main = release_main if command == "run_polar.py" else polar_main
    outcome = call(main, [*base, *REQUIRED[command], "--device", value], capsys)
    assert_one_line_error(outcome, "argument --device", value, bound=5)


def test_train_and_eval_share_the_checks(capsys):
    for command in ("train", "eval"):
        outcome = call(polar_main, [command, "--target_diff", 1, "--beam_size", 0], capsys)
        assert_one_line_error(outcome, "argument --beam_size: expected a positive integer, got 0", bound=5)


def test_values_the_release_gives_a_meaning_are_kept():
    """Clamped, 'off' and 'default' readings of the release parse (and resolve) as it reads them."""
    from polar.release_cli import resolve_release_flags

    args = release_parser().parse_args([
        "--target_diff", "1", "--original_path_weight", "5", "--keep_original_prob", "2", "--grad_clip_norm", "-1",
        "--anti_original_lambda", "-1", "--len_penalty", "-2", "--warmup_steps", "-5", "--min_lr", "-1",
        "--max_new_tokens", "0", "--num_samples", "0", "--top_k_ops", "5",
    ])
    resolved = resolve_release_flags(args)
    assert (resolved.warmup_steps, resolved.min_lr, resolved.max_new_tokens, resolved.num_samples) == (0, 0.0, 50, 500)
    assert resolved.original_path_weight == 5.0 and resolved.keep_original_prob == 2.0  # clamped where used
    with pytest.raises(ValueError, match="--polar_d_model: 30 is not divisible by --polar_heads 4"):
        resolve_release_flags(release_parser().parse_args(["--target_diff", "1", "--polar_d_model", "30"]))


@pytest.mark.parametrize("argv,fragment", [
    (["search", "--out", "x", "--num_simulations", "-5"], "argument --num_simulations: expected a positive integer"),
    (["search", "--out", "x", "--time_limit", "-5"], "argument --time_limit: expected a positive finite number"),
    (["run", "--question", "q", "--program", "0-99999999"], "layer 99999999"),
    (["run", "--question", "q", "--program", "0-999999999"], "layer 999999999 is beyond any model"),
    (["run", "--question", "q", "--program", "[" * 100_000], "nested too deeply"),
])
def test_real_processes_stop_fast_in_bounded_memory(argv, fragment):
    """``--program "0-99999999"`` took 4.3 GB and 16 s before its error; now the range is checked
    before it is expanded (and before torch is imported)."""
    outcome = run_process(*argv, timeout=30, memory_gb=1)
    assert_one_line_error(outcome, fragment, bound=10)


@pytest.mark.parametrize("program", ["+5", "1_0", "\u0663", "0--5", "9" * 5000, "0-5,", "[1.0]", "[true]", "[[1]]"])
def test_a_program_that_is_not_layer_indices_is_refused_before_loading(program, capsys):
    # int() read "+5" as 5, "1_0" as 10 and an Arabic-Indic three as 3; 5,000 digits raised
    # Python's int-string limit without naming the program
    outcome = call(polar_main, ["run", "--question", "q", "--program", program], capsys)
    assert_one_line_error(outcome, "program", bound=5)


def test_an_empty_question_is_refused_before_loading(capsys):
    outcome = call(polar_main, ["run", "--question", "  ", "--program", "0-3"], capsys)
    assert_one_line_error(outcome, "argument --question: the question is empty", bound=5)


@pytest.mark.parametrize("command", ["search", "demo", "train", "eval", "run_polar.py"])
def test_an_output_folder_that_cannot_be_written_stops_the_job_at_its_start(tmp_path, command, capsys):
    # training ran an epoch (or all of them) before its first write failed with a bare OSError
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "results"
    flag = "--out" if command in ("search", "demo") else "--save_dir"
    argv = {"search": ["search", "--limit", 1], "demo": ["demo"], "train": ["train", "--target_diff", 1],
            "eval": ["eval", "--target_diff", 1], "run_polar.py": ["--target_diff", 1]}[command]
    main = release_main if command == "run_polar.py" else polar_main
    outcome = call(main, [*argv, flag, out, "--data_root" if flag == "--save_dir" else "--seed",
                          tmp_path / "no-data" if flag == "--save_dir" else 1], capsys)
    assert_one_line_error(outcome, f"argument {flag}: cannot write in {out}", f"{blocker} is not a folder", bound=10)
    assert not any(p != blocker for p in tmp_path.iterdir())


def test_run_polar_process_refuses_zero_epochs():
    outcome = run_process("--target_diff", "1", "--num_epochs", "0", entry="run_polar.py", timeout=30)
    assert_one_line_error(outcome, "run_polar.py: error: argument --num_epochs: expected a positive integer, got 0")
