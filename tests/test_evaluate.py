"""Evaluation metrics on a hand-worked example with a fake scorer (no model needed)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from polar.decode import DecodeConfig
from polar.evaluate import EvalConfig, format_metrics, majority_vote, run_evaluation, write_report

D = 4
P1, FULL, P3 = [0, 1], [0, 1, 2, 3], [2, 3]


@dataclass
class S:
    id: str
    answer: str
    valid_paths: list = field(default_factory=list)
    invalid_paths: list = field(default_factory=list)
    initial_score: float | None = None
    question: str = ""

    def __post_init__(self):
        self.question = f"question {self.id}"


@dataclass
class Out:
    correct: bool
    answer: str | None
    text: str = ""
    layers_executed: int = 0


class FeaturesAreLogits(torch.nn.Module):
    """Stand-in predictor: the first token's features are the logits, so decoding is hand-made."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, features, mask):
        first = features[:, 0]
        return first[:, :D], first[:, D:].reshape(-1, D, 3)


class FakeScorer:
    """Answers from a table keyed by (question id, program); records every call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def score(self, questions, programs):
        self.calls.append(len(programs))
        out = []
        for q, p in zip(questions, programs):
            answer = self.table[q.id].get(tuple(p))
            out.append(Out(answer is not None and answer == q.answer, answer))
        return out


def logits_features():
    """seg: segments [0,1] and [2,3]; ops: A keep .9 / skip .05 / repeat .05, B skip .6 / keep .3.
    Beam (5 beams, 2 ops): keep+skip .54 -> [0,1]; keep+keep .27 -> full; skip+skip .03 -> empty;
    skip+keep .015 -> [2,3]. With top_k_paths=3 every question gets [P1, FULL, []]: the empty
    program keeps its slot (scored 0, never run), as in the release; [2,3] is fourth."""
    seg = torch.tensor([9.0, -9, 9, -9])
    ops = torch.zeros(D, 3)
    ops[0] = torch.log(torch.tensor([0.05, 0.9, 0.05]))
    ops[2] = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    return torch.cat([seg, ops.flatten()]).unsqueeze(0)  # one "token"


SAMPLES = [
    S("a", "1", invalid_paths=[P1], initial_score=1.0),
    S("b", "5", valid_paths=[P3], initial_score=0.0),
    S("c", "7", valid_paths=[P1]),
]
TABLE = {
    "a": {tuple(FULL): "1", tuple(P1): "2", tuple(P3): "2"},
    "b": {tuple(FULL): "4", tuple(P1): "5", tuple(P3): None},
    "c": {tuple(FULL): "0", tuple(P1): "0", tuple(P3): "0"},
}


def evaluate(trust=True, top_k_paths=3):
    scorer = FakeScorer(TABLE)
    config = EvalConfig(DecodeConfig(beam_size=5, top_k_ops=2, top_k_paths=top_k_paths), trust_valid_cache=trust)
    report = run_evaluation(FeaturesAreLogits(), SAMPLES, [logits_features()] * 3, [1, 1, 2], scorer, D, config)
    return report, scorer


def test_majority_vote_ties_go_to_higher_ranked():
    assert majority_vote(["2", "1", "1"]) == 1
    assert majority_vote(["5", "4", None]) == 0
    assert majority_vote([None, "3", "4", "4 "]) == 2  # whitespace-normalised; 4 beats 3


def test_majority_vote_groups_equivalent_spellings():
    # "1,000", "1000" and "\\text{1000}" are one answer (3 votes) against two votes for 7
    assert majority_vote(["7", "1,000", "7", "1000", "\\text{1000}"]) == 1
    assert majority_vote(["(B)", "A", "B"]) == 0  # choice letters with or without parentheses
    assert majority_vote([None, None]) is None


def test_hand_worked_metrics():
    report, scorer = evaluate()
    assert scorer.calls == [9]  # baseline + 2 runnable programs for 3 questions, in ONE scorer call
    q = {r["id"]: r for r in report["per_question"]}
    assert q["a"]["programs"] == [P1, FULL, []]
    assert q["b"]["answers"][2] is None and q["b"]["live_correct"][2] is False  # the empty slot
    assert q["a"]["cached"] == [False, None, None] and q["c"]["cached"] == [True, None, None]
    assert q["a"]["vote_answer"] == "2" and not q["a"]["vote_correct"]
    assert q["b"]["vote_answer"] == "5" and q["b"]["vote_correct"]  # 1-1 tie, top-ranked wins
    m = report["metrics"]["overall"]
    assert m["num_questions"] == 3
    assert m["pass_at_k"] == pytest.approx(1.0)  # a: live full; b: live P1; c: from cache
    assert m["pass_at_k_live"] == pytest.approx(2 / 3)
    assert m["pass_at_1"] == pytest.approx(1 / 3)
    assert m["vote_at_k"] == pytest.approx(1 / 3)
    assert m["baseline_accuracy"] == pytest.approx(1 / 3)
    assert m["mean_layers_top1"] == 2 and m["layer_ratio_top1"] == 0.5
    assert m["mean_layers_vote_at_k"] == 6
    assert m["cache_hit_rate"] == pytest.approx(2 / 9)  # a: P1 (invalid), c: P1 (valid)
    assert m["search_initial_score"] == pytest.approx(0.5)
    assert m["seconds_per_question"] >= 0
    per = report["metrics"]["per_difficulty"]
    assert per["1"]["num_questions"] == 2 and per["1"]["pass_at_1"] == 0.5
    assert per["2"]["pass_at_k"] == 1.0 and per["2"]["baseline_accuracy"] == 0.0
    overall = format_metrics(report["metrics"]).splitlines()[0]
    assert overall.startswith("overall: n=3 | live: pass@3=0.667 pass@1=0.333 vote@3=0.333 baseline=0.333")
    assert "| pass@3 (from search labels, cached for 22% of programs)=1.000, 33% of questions" in overall


def test_a_lower_beam_never_takes_the_empty_program_s_slot():
    """The release evaluates the first top_k_paths beams; [2,3] (fourth) is run only with k = 4."""
    report, scorer = evaluate(top_k_paths=4)
    assert scorer.calls == [12]
    assert all(r["programs"] == [P1, FULL, [], P3] for r in report["per_question"])
    assert report["metrics"]["overall"]["k"] == 4


def test_no_trust_valid_cache_runs_everything_live():
    report, _ = evaluate(trust=False)
    m = report["metrics"]["overall"]
    assert m["cache_hit_rate"] == 0.0 and m["pass_at_k"] == pytest.approx(2 / 3)


def test_report_file_and_plots(tmp_path):
    report, _ = evaluate()
    path = write_report(report, tmp_path / "eval" / "eval_test.json", D,
                        {"model": "tiny", "prompt_style": "plain", "max_new_tokens": 50, "seed": 42})
    data = json.loads(path.read_text())
    assert data["settings"]["prompt_style"] == "plain" and "versions" in data
    assert data["metrics"]["overall"]["pass_at_1"] == pytest.approx(1 / 3)
    assert len(data["per_question"]) == 3
    assert (tmp_path / "eval" / "eval_test_accuracy_vs_layers.png").stat().st_size > 0
    assert (tmp_path / "eval" / "eval_test_layer_heatmap.png").stat().st_size > 0
    assert not math.isnan(data["metrics"]["overall"]["mean_layers_top1"])
