"""Honest evaluation of a trained predictor.

For every test question the predictor's top-k programs are decoded (the release's top-k beams,
:func:`polar.decode.decode_programs`) and every one of them is run live, except an empty program
(a beam that skips every layer): as in the release it keeps its slot and counts as wrong. Two kinds of numbers are reported, live ones first (in the JSON's ``summary``, in
:func:`format_metrics` and in the metric dicts):

* live numbers, always run through the engine: ``pass_at_k_live`` (any of the top-k programs
  correct: an oracle, it needs the gold answer to pick), ``pass_at_1`` (the top-1 program),
  ``vote_at_k`` (majority answer over the top-k programs; a tie goes to the answer of the
  higher-ranked program) and ``baseline_accuracy`` (the full-depth program), with their cost in
  executed layers;
* the release's metric, ``pass_at_k`` ("correct found rate"). With ``trust_valid_cache`` (on by
  default, as in the release) a program that search already labelled valid/invalid for this
  question is scored from that label instead of its live run, so the number can rest on the
  supervision file rather than on the model: it is printed as "from search labels, cached",
  with the share of programs and of questions that the labels decided.

All live runs of all questions go to the scorer in one call, so the engine batches them freely.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from polar.decode import DecodeConfig, predict_candidates
from polar.io import run_metadata, write_json_atomic
from polar.programs import full_program
from polar.scoring import Outcome


@dataclass(frozen=True)
class EvalConfig:
    decode: DecodeConfig = DecodeConfig()
    trust_valid_cache: bool = True


@dataclass
class QuestionResult:
    """Everything measured on one question; the JSON's ``per_question`` entries."""

    id: str
    difficulty: str
    programs: list[list[int]]
    answers: list[str | None]  # live answers of each program
    live_correct: list[bool]
    cached: list[bool | None]  # search's label when used, else None
    baseline_answer: str | None
    baseline_correct: bool
    vote_answer: str | None
    vote_correct: bool
    pass_at_k: bool
    initial_score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# The outcome of an empty program (a beam that skips every layer): the release scores it 0
# without running it, and it keeps its place among the top-k.
NOT_RUN = Outcome(correct=False, answer=None, text="", layers_executed=0)


def cache_label(sample: Any, program: Sequence[int]) -> bool | None:
    """Search's verdict on this program for this question: True valid, False invalid, None unknown."""
    key = list(program)
    if any(list(p) == key for p in sample.valid_paths):
        return True
    if any(list(p) == key for p in (getattr(sample, "invalid_paths", None) or [])):
        return False
    return None


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the program whose answer wins the vote; ties go to the earliest (best-ranked)
    program. Programs without an answer do not vote; ``None`` when nobody answered.

    Answers are grouped by :func:`polar.math.normalize_answer` (units, ``\\text{}``, thousands
    separators, ``x=`` prefixes, choice letters), so ``"1,000"`` and ``"1000"`` vote together.
    """
    from polar.math import normalize_answer

    normalised = [None if a is None else normalize_answer(a) for a in answers]
    counts = Counter(a for a in normalised if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, a in enumerate(normalised) if a is not None and counts[a] == top)


def run_evaluation(
    model: torch.nn.Module,
    samples: Sequence[Any],
    features: Sequence[torch.Tensor],
    difficulties: Sequence[str | int],
    scorer: Any,
    num_layers: int,
    config: EvalConfig = EvalConfig(),
) -> dict[str, Any]:
    """Decode, run live, and compute metrics. Returns ``{"metrics": ..., "per_question": ...}``."""
    started = time.perf_counter()
    candidates = predict_candidates(model, list(features), config.decode)
    predicted = time.perf_counter()
    full = full_program(num_layers)
    questions, programs = [], []
    for sample, cands in zip(samples, candidates):
        for program in [full] + [c.program for c in cands if c.program]:  # an empty program never runs
            questions.append(sample)
            programs.append(program)
    outcomes = iter(scorer.score(questions, programs))
    finished = time.perf_counter()

    results: list[QuestionResult] = []
    for sample, cands, diff in zip(samples, candidates, difficulties):
        base = next(outcomes)
        live = [next(outcomes) if c.program else NOT_RUN for c in cands]
        results.append(_question_result(sample, str(diff), [c.program for c in cands], base, live, config))

    timing = {
        "questions": len(results),
        "seconds": finished - started,
        "predict_seconds": predicted - started,
        "live_seconds": finished - predicted,
    }
    per_question = [asdict(r) for r in results]
    return {"metrics": build_metrics(per_question, num_layers, timing), "per_question": per_question,
            "timing": timing}


def build_metrics(per_question: Sequence[dict], num_layers: int, timing: dict[str, float]) -> dict[str, Any]:
    """Overall and per-difficulty metrics from ``per_question`` records (also used to merge shards)."""
    results = [QuestionResult(**q) for q in per_question]
    n = max(1, len(results))
    per_q_timing = {
        "seconds_per_question": timing["seconds"] / n,
        "predict_seconds_per_question": timing["predict_seconds"] / n,
        "live_seconds_per_question": timing["live_seconds"] / n,
    }
    by_diff: dict[str, list[QuestionResult]] = {}
    for r in results:
        by_diff.setdefault(r.difficulty, []).append(r)
    metrics: dict[str, Any] = {"overall": {**summarise(results, num_layers), **per_q_timing}}
    metrics["per_difficulty"] = {d: summarise(rs, num_layers) for d, rs in sorted(by_diff.items())}
    return metrics


def merge_reports(reports: Sequence[dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Join the reports of question shards (one per rank). ``seconds_per_question`` becomes the
    summed compute time of all shards per question, i.e. the cost on one device."""
    per_question = [q for r in reports for q in r["per_question"]]
    timing = {key: sum(r["timing"][key] for r in reports)
              for key in ("questions", "seconds", "predict_seconds", "live_seconds")}
    timing["shards"] = len(reports)
    return {"metrics": build_metrics(per_question, num_layers, timing), "per_question": per_question,
            "timing": timing}


def _question_result(sample, diff, programs, base, live, config: EvalConfig) -> QuestionResult:
    cached = [cache_label(sample, p) if config.trust_valid_cache else None for p in programs]
    found = [c if c is not None else o.correct for c, o in zip(cached, live)]
    answers = [o.answer for o in live]
    winner = majority_vote(answers)
    score = getattr(sample, "initial_score", None)
    return QuestionResult(
        id=str(sample.id),
        difficulty=diff,
        programs=[list(p) for p in programs],
        answers=answers,
        live_correct=[bool(o.correct) for o in live],
        cached=cached,
        baseline_answer=base.answer,
        baseline_correct=bool(base.correct),
        vote_answer=None if winner is None else answers[winner],
        vote_correct=False if winner is None else bool(live[winner].correct),
        pass_at_k=any(found),
        initial_score=None if score is None else float(score),
    )


def summarise(results: Sequence[QuestionResult], num_layers: int) -> dict[str, float | int | str | None]:
    """Metrics of a group of questions (one difficulty, or all)."""
    n = len(results)
    if n == 0:
        return {"num_questions": 0}

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    top1_layers = mean(len(r.programs[0]) for r in results)
    checked = [c for r in results for c in r.cached]
    scores = [r.initial_score for r in results if r.initial_score is not None]
    hits = sum(c is not None for c in checked)
    # live metrics first: they are what a deployment gets; the release's pass@k may rest on labels
    return {
        "num_questions": n,
        "k": max(len(r.programs) for r in results),
        "pass_at_k_live": mean(any(r.live_correct) for r in results),
        "pass_at_1": mean(r.live_correct[0] for r in results),
        "vote_at_k": mean(r.vote_correct for r in results),
        "baseline_accuracy": mean(r.baseline_correct for r in results),
        "mean_layers_top1": top1_layers,
        "layer_ratio_top1": top1_layers / num_layers,
        "mean_layers_vote_at_k": mean(sum(len(p) for p in r.programs) for r in results),
        "mean_programs_per_question": mean(len(r.programs) for r in results),
        "pass_at_k": mean(r.pass_at_k for r in results),
        "pass_at_k_source": "cached search labels where available" if hits else "live",
        "cache_hit_rate": hits / len(checked) if checked else 0.0,
        "pass_at_k_only_from_cache": mean(r.pass_at_k and not any(r.live_correct) for r in results),
        "search_initial_score": mean(scores) if scores else None,
    }


def summary_block(metrics: dict[str, Any]) -> dict[str, Any]:
    """The evaluation JSON's ``summary``: live numbers first, then the release's pass@k labelled
    with where its verdicts came from (``--trust_valid_cache``, on by default as in the release,
    scores a program search already labelled from that label, without running it)."""
    m = metrics["overall"]
    if not m.get("num_questions"):
        return {"headline": "no questions evaluated"}
    return {
        "headline": format_group("overall", m),
        "live": {key: m[key] for key in ("num_questions", "k", "pass_at_k_live", "pass_at_1", "vote_at_k",
                                          "baseline_accuracy", "mean_layers_top1", "layer_ratio_top1")},
        "release_pass_at_k": {
            "value": m["pass_at_k"],
            "verdicts": m["pass_at_k_source"],
            "cache_hit_rate": m["cache_hit_rate"],
            "questions_only_from_cache": m["pass_at_k_only_from_cache"],
        },
    }


def write_report(
    report: dict[str, Any], path: str | Path, num_layers: int, settings: dict[str, Any], log=print
) -> Path:
    """Write the JSON (atomically, with the settings block) and the two plots next to it."""
    path = Path(path)
    write_json_atomic(path, {"summary": summary_block(report["metrics"]), **run_metadata(**settings), **report})
    overall = report["metrics"]["overall"]
    try:
        from polar.plots import plot_accuracy_vs_layers, plot_layer_heatmap
    except ImportError as err:  # plotting is a convenience; the JSON is the result
        log(f"note: plots skipped ({err})")
        return path
    if overall.get("num_questions"):
        points = [
            {"label": "full depth", "mean_layers": float(num_layers), "accuracy": overall["baseline_accuracy"]},
            {"label": "PoLar top-1", "mean_layers": overall["mean_layers_top1"], "accuracy": overall["pass_at_1"]},
            {"label": "PoLar vote@k", "mean_layers": overall["mean_layers_vote_at_k"], "accuracy": overall["vote_at_k"]},
        ]
        plot_accuracy_vs_layers(points, num_layers, path.with_name(path.stem + "_accuracy_vs_layers.png"))
        top1 = [q["programs"][0] for q in report["per_question"]]
        plot_layer_heatmap(top1, num_layers, path.with_name(path.stem + "_layer_heatmap.png"),
                           title="Layers the top-1 programs skip / repeat")
    return path


def format_group(name: str, m: dict[str, Any]) -> str:
    """One line for a group of questions: live metrics first, then the release's pass@k, labelled
    "from search labels, cached" when any of its verdicts came from the supervision file."""
    k = m.get("k", "k")
    line = (
        f"{name}: n={m['num_questions']} | live: pass@{k}={m['pass_at_k_live']:.3f} pass@1={m['pass_at_1']:.3f} "
        f"vote@{k}={m['vote_at_k']:.3f} baseline={m['baseline_accuracy']:.3f} "
        f"layers@1={m['mean_layers_top1']:.1f} ({m['layer_ratio_top1']:.2f}D)"
    )
    if m.get("cache_hit_rate", 0.0) > 0:
        only = m.get("pass_at_k_only_from_cache", 0.0)
        line += (f" | pass@{k} (from search labels, cached for {m['cache_hit_rate']:.0%} of programs)="
                 f"{m['pass_at_k']:.3f}")
        if only > 0:
            line += f", {only:.0%} of questions correct only by a cached label (no live run confirms it)"
    else:
        line += f" | release pass@{k} = live (no cached label used)"
    return line


def format_metrics(metrics: dict[str, Any]) -> str:
    """A few readable lines: overall first, then each difficulty (the release's breakdown)."""
    groups = [("overall", metrics["overall"])] + [(f"diff {d}", m) for d, m in metrics["per_difficulty"].items()]
    return "\n".join(format_group(name, m) for name, m in groups if m.get("num_questions"))
