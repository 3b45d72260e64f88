"""ProgramScorer: prompts once per question, length-sorted chunks, input order restored."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from polar.datasets import Question
from polar.prompts import format_prompt
from polar.scoring import Outcome, ProgramScorer


@dataclass
class FakeGeneration:
    token_ids: list[int]
    text: str
    layers_executed: int


class FakeTokenizer:
    """One token per whitespace-separated word: enough to sort prompts by length."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


class FakeRunner:
    """Answers ``\\boxed{<number of layers>}``: a program is "correct" when its length is the gold."""

    model_name = "fake/model"
    num_layers = 6

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.calls: list[tuple[list[str], list[list[int]]]] = []

    def generate(self, prompts, programs, max_new_tokens=50, **kwargs):
        self.calls.append((list(prompts), [list(p) for p in programs]))
        return [FakeGeneration([1], f"So \\boxed{{{len(p)}}}", len(p)) for p in programs]


def q(i: int, words: int, answer: str) -> Question:
    return Question(id=f"q{i}", question=" ".join(["word"] * words), answer=answer, source="test")


def test_outcomes_come_back_in_input_order_and_are_checked():
    runner = FakeRunner()
    scorer = ProgramScorer(runner, batch_size=2)
    qs = [q(0, 30, "5"), q(1, 3, "4"), q(2, 10, "\\boxed{5}"), q(3, 3, "6")]
    programs = [[0, 1, 2, 3, 4], [0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    out = scorer.score(qs, programs)
    assert out == [
        Outcome(True, "5", "So \\boxed{5}", 5),
        Outcome(False, "3", "So \\boxed{3}", 3),
        Outcome(True, "5", "So \\boxed{5}", 5),
        Outcome(True, "6", "So \\boxed{6}", 6),
    ]


def test_chunks_respect_batch_size_and_are_sorted_by_prompt_length():
    runner = FakeRunner()
    scorer = ProgramScorer(runner, batch_size=3)
    qs = [q(i, words, "1") for i, words in enumerate([40, 5, 22, 9, 31, 1, 17])]
    scorer.score(qs, [[0, 1]] * len(qs))
    assert [len(prompts) for prompts, _ in runner.calls] == [3, 3, 1]
    sent = [p for prompts, _ in runner.calls for p in prompts]
    lengths = [len(p.split()) for p in sent]
    assert lengths == sorted(lengths)
    assert scorer.generate_calls == 3


def test_prompt_is_the_spec_prompt_and_formatted_once_per_question(monkeypatch):
    import polar.prompts

    calls = []
    real = polar.prompts.format_prompt

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(polar.prompts, "format_prompt", counting)
    runner = FakeRunner()
    scorer = ProgramScorer(runner)
    question = q(0, 4, "2")
    scorer.score([question] * 3, [[0], [0, 1], [0, 1, 2]])
    scorer.score([question], [[1, 2]])
    assert len(calls) == 1
    assert runner.calls[0][0][0] == format_prompt(question.question, "plain")
    assert "\\boxed{ANSWER}" in runner.calls[0][0][0]


def test_identical_pairs_run_once():
    runner = FakeRunner()
    scorer = ProgramScorer(runner)
    out = scorer.score([q(0, 2, "2")] * 3, [[0, 1], [0, 1], [1, 2, 3]])
    assert sum(len(p) for p, _ in runner.calls) == 2
    assert [o.correct for o in out] == [True, True, False]


def test_answer_mode_lenient_accepts_an_unboxed_final_answer():
    class Plain(FakeRunner):
        def generate(self, prompts, programs, max_new_tokens=50, **kwargs):
            return [FakeGeneration([1], "The answer is 7", 2) for _ in programs]

    question = [q(0, 2, "7")]
    assert ProgramScorer(Plain(), answer_mode="boxed").score(question, [[0, 1]])[0].correct is False
    lenient = ProgramScorer(Plain(), answer_mode="lenient").score(question, [[0, 1]])[0]
    assert lenient.correct is True and lenient.answer == "7"


def test_settings_and_argument_checks():
    scorer = ProgramScorer(FakeRunner(), prompt_style="plain", max_new_tokens=12, fewshot=0)
    s = scorer.settings()
    assert (s["model"], s["num_layers"], s["max_new_tokens"], s["answer_mode"]) == ("fake/model", 6, 12, "boxed")
    with pytest.raises(ValueError):
        ProgramScorer(FakeRunner(), answer_mode="fuzzy")
    with pytest.raises(ValueError):
        ProgramScorer(FakeRunner(), batch_size=0)
    with pytest.raises(ValueError):
        scorer.score([q(0, 1, "1")], [])
    assert scorer.score([], []) == []
