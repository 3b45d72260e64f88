"""(question, program) -> correct?  The one place where prompts, the engine and answer checking meet.

Search and evaluation both reduce their work to flat lists of (question, program) pairs. The
scorer turns those into engine batches: it formats each question's prompt once, sorts the pairs
by prompt length and lets the engine plan chunks of similar length (``runner.plan_chunks``: less
padding, less wasted compute), runs each chunk with one heterogeneous ``runner.generate`` call,
and puts the outcomes back in the caller's order. It knows nothing about KV caches or MCTS.

Answer checking runs on the CPU. With ``judge_workers`` > 0 it runs in worker processes while the
device generates the next chunk, so a round costs about max(generation, checking) instead of their
sum; a wrong answer can cost milliseconds in ``math-verify``, and a search round checks hundreds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from polar.engine import ProgramRunner


class QuestionLike(Protocol):
    """What the scorer reads from a question (``polar.datasets.Question`` satisfies it)."""

    id: str
    question: str
    answer: str


def check_max_new_tokens(runner: Any, max_new_tokens: int) -> None:
    """Refuse a token budget beyond the model's context (``max_position_embeddings``).

    The engine sizes each sequence's KV cache for the whole budget up front, so an absurd
    ``--max_new_tokens`` would end deep inside the allocator (``can't allocate 12800000020224
    bytes``) instead of naming the flag; and past the context the model has never seen a position.
    Runners without a config (test doubles) are not checked.
    """
    context = getattr(getattr(runner, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and context > 0 and max_new_tokens > context:
        raise ValueError(f"argument --max_new_tokens: {max_new_tokens} is beyond the context of "
                         f"{getattr(runner, 'model_name', 'the model')} ({context} positions, "
                         "max_position_embeddings in its config)")


@dataclass(frozen=True)
class Outcome:
    """The result of running one program on one question."""

    correct: bool
    answer: str | None
    text: str
    layers_executed: int
    tokens: int = field(default=0, compare=False)  # new tokens generated (a stop token ends early)
    stopped: bool = field(default=False, compare=False)  # a stop token ended it


class ProgramScorer:
    """Score many (question, program) pairs in as few engine calls as possible.

    ``batch_size`` is the most sequences per ``runner.generate`` call; it bounds memory, not
    correctness: outcomes do not depend on how pairs are chunked. ``judge_workers``: processes
    that check answers while the next chunk generates (None: one per spare CPU core, up to 8, and
    none on machines with fewer than 4 cores; 0: check in this process).
    """

    def __init__(
        self,
        runner: "ProgramRunner",
        prompt_style: str = "plain",
        answer_mode: str = "boxed",
        max_new_tokens: int = 50,
        fewshot: int = 0,
        batch_size: int = 64,
        judge_workers: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if answer_mode not in ("boxed", "lenient"):
            raise ValueError(f"answer_mode must be 'boxed' or 'lenient', got {answer_mode!r}")
        check_max_new_tokens(runner, max_new_tokens)
        self.runner = runner
        self.prompt_style = prompt_style
        self.answer_mode = answer_mode
        self.max_new_tokens = max_new_tokens
        self.fewshot = fewshot
        self.batch_size = batch_size
        cores = os.cpu_count() or 1
        self.judge_workers = (min(8, cores - 1) if cores >= 4 else 0) if judge_workers is None else judge_workers
        self._pool: Any = None
        # Prompts and their token counts are reused across every program of a question, and
        # search scores ~100 programs per question, so both are cached by question text.
        self._prompts: dict[tuple[str, str], tuple[str, int]] = {}
        self.generate_calls = 0
        self.pairs_scored = 0
        # seconds spent generating, and waiting for answer checks after the last chunk
        self.seconds = {"generate": 0.0, "judge_wait": 0.0}

    # ------------------------------------------------------------------ public API

    def settings(self) -> dict[str, Any]:
        """The settings that change outcomes; every output file records them."""
        return {
            "model": getattr(self.runner, "model_name", None),
            "num_layers": getattr(self.runner, "num_layers", None),
            "prompt_style": self.prompt_style,
            "answer_mode": self.answer_mode,
            "max_new_tokens": self.max_new_tokens,
            "fewshot": self.fewshot,
            "decoding": "greedy",
        }

    def score(self, questions: Sequence[QuestionLike], programs: Sequence[Sequence[int]]) -> list[Outcome]:
        """Run ``programs[i]`` on ``questions[i]`` for every i; return outcomes in input order."""
        if len(questions) != len(programs):
            raise ValueError(
                f"score() needs one program per question, got {len(questions)} questions "
                f"and {len(programs)} programs"
            )
        if not questions:
            return []
        prompts = [self._prompt(q) for q in questions]
        # Identical pairs (same prompt, gold and program) are run once: evaluation often asks for
        # the same program twice, and greedy decoding makes the second run redundant.
        unique: dict[tuple[str, str, tuple[int, ...]], int] = {}
        slot_of: list[int] = []
        for q, (text, _), program in zip(questions, prompts, programs):
            key = (text, str(q.answer), tuple(program))
            slot_of.append(unique.setdefault(key, len(unique)))
        keys = list(unique)
        lengths = {text: n for text, n in prompts}
        order = sorted(range(len(keys)), key=lambda k: (lengths[keys[k][0]], k))
        plan = getattr(self.runner, "plan_chunks", None)
        if plan is not None:
            chunks = [[order[i] for i in c]
                      for c in plan([lengths[keys[k][0]] for k in order], self.max_new_tokens, self.batch_size)]
        else:
            chunks = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

        results: list[Outcome | None] = [None] * len(keys)
        pending: list[tuple[list[int], Callable[[], list[Outcome]]]] = []
        for chunk in chunks:
            started = time.perf_counter()
            gens = self.runner.generate(
                [keys[k][0] for k in chunk],
                [list(keys[k][2]) for k in chunk],
                max_new_tokens=self.max_new_tokens,
                batch_size=len(chunk),
            )
            self.seconds["generate"] += time.perf_counter() - started
            self.generate_calls += 1
            pending.append((chunk, self._judge(gens, [keys[k][1] for k in chunk])))
        started = time.perf_counter()
        for chunk, outcomes in pending:
            for k, outcome in zip(chunk, outcomes()):
                results[k] = outcome
        self.seconds["judge_wait"] += time.perf_counter() - started
        self.pairs_scored += len(keys)
        return [results[slot] for slot in slot_of]  # type: ignore[misc]

    def close(self) -> None:
        """Stop the answer-checking workers (they also stop when the scorer is collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def prompt_text(self, question: QuestionLike) -> str:
        """The exact prompt text this scorer sends to the engine for ``question``."""
        return self._prompt(question)[0]

    # ------------------------------------------------------------------ helpers

    def _prompt(self, question: QuestionLike) -> tuple[str, int]:
        """Formatted prompt text and its token count, computed once per question."""
        key = (question.question, question.id)
        cached = self._prompts.get(key)
        if cached is None:
            from polar.prompts import format_prompt

            tokenizer = getattr(self.runner, "tokenizer", None)
            text = format_prompt(question.question, self.prompt_style, tokenizer=tokenizer, fewshot=self.fewshot)
            cached = (text, _token_count(tokenizer, text))
            self._prompts[key] = cached
        return cached

    def _judge(self, gens: Sequence[Any], golds: Sequence[str]) -> Callable[[], list[Outcome]]:
        """Check each completion's answer against its gold; returns a function that gives the
        outcomes (in worker processes when ``judge_workers`` > 0, so checking overlaps the next
        chunk's generation)."""
        texts = [g.text for g in gens]
        if self.judge_workers <= 0 or len(texts) < 2:
            verdicts = judge_texts(texts, list(golds), self.prompt_style, self.answer_mode)
            return lambda: _outcomes(gens, verdicts)
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the workers never touch the parent's CUDA state
            self._pool = ProcessPoolExecutor(self.judge_workers, mp_context=multiprocessing.get_context("spawn"))
        size = max(1, -(-len(texts) // (4 * self.judge_workers)))
        futures = [
            self._pool.submit(judge_texts, texts[i:i + size], list(golds[i:i + size]), self.prompt_style, self.answer_mode)
            for i in range(0, len(texts), size)
        ]
        return lambda: _outcomes(gens, [v for f in futures for v in f.result()])


def judge_texts(texts: Sequence[str], golds: Sequence[str], prompt_style: str, answer_mode: str) -> list[tuple[str | None, bool]]:
    """(extracted answer, correct?) per completion: the scorer's whole check, in one function so a
    worker process can run it."""
    from polar.math import check_answers, extract_answer
    from polar.prompts import completion_answer_text

    answers = [extract_answer(completion_answer_text(t, prompt_style), answer_mode) for t in texts]
    # No extracted answer is simply wrong; only real answers go to the (slower) checker.
    present = [i for i, a in enumerate(answers) if a is not None]
    checked = check_answers([answers[i] for i in present], [golds[i] for i in present]) if present else []
    correct = [False] * len(answers)
    for i, ok in zip(present, checked):
        correct[i] = bool(ok)
    return list(zip(answers, correct))


def _outcomes(gens: Sequence[Any], verdicts: Sequence[tuple[str | None, bool]]) -> list[Outcome]:
    return [
        Outcome(correct=bool(ok), answer=answer, text=g.text, layers_executed=int(g.layers_executed),
                tokens=len(g.token_ids), stopped=bool(getattr(g, "stopped", False)))
        for g, (answer, ok) in zip(gens, verdicts)
    ]


def _token_count(tokenizer: Any, text: str) -> int:
    """Prompt length in tokens (for sorting only); falls back to characters without a tokenizer."""
    if tokenizer is None:
        return len(text)
    try:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception:  # a tokenizer that cannot encode plain text still sorts by characters
        return len(text)
