"""The prompt every question is asked with, and how it is wrapped for each model family.

One prompt text (SPEC 4) asks for the answer inside ``\\boxed{}``. How it reaches the model is a
*style*, recorded in every output file because it changes which programs are correct:

- ``plain``: the text as is (the reference setting for Llama).
- ``chat``: the tokenizer's chat template with the system prompt "You are a helpful assistant."
  (Qwen2.5, Qwen1.5-MoE).
- ``chat_nothink``: the chat template with thinking disabled (Qwen3); the answer is the text after
  ``</think>``.

Few-shot is orthogonal to the style: ``fewshot=N`` puts N short worked examples with boxed
answers in front (as earlier turns in chat styles). It helps tiny models learn the answer format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from polar.errors import PolarError

PROMPT_STYLES = ("plain", "chat", "chat_nothink")
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_TEMPLATE = (
    "Solve the following math problem and output ONLY the final answer directly, formatted "
    "strictly as \\boxed{ANSWER}.\n### Problem Start\n{question}\n### Problem End\nAnswer:"
)

# Short, correct, and easy: they teach the format, not the math.
FEWSHOT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("What is $7 + 5$?", "12"),
    ("Compute $6 \\times 8$.", "48"),
    ("What is $\\frac{1}{2} + \\frac{1}{4}$?", "\\frac{3}{4}"),
    ("Solve for $x$: $2x + 3 = 11$.", "4"),
)


def question_prompt(question: str) -> str:
    """The SPEC prompt for one question (no wrapping). ``str.format`` would trip on ``{ANSWER}``."""
    return PROMPT_TEMPLATE.replace("{question}", question)


def _fewshot_pairs(fewshot: int, examples: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    examples = FEWSHOT_EXAMPLES if examples is None else examples
    if fewshot < 0:
        raise ValueError(f"fewshot must be >= 0, got {fewshot}")
    if fewshot > len(examples):
        raise ValueError(f"fewshot={fewshot} but only {len(examples)} examples are available")
    return [(q, f"\\boxed{{{a}}}") for q, a in list(examples)[:fewshot]]


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    question: str,
    style: str = "plain",
    tokenizer: Any = None,
    fewshot: int = 0,
    fewshot_examples: Sequence[tuple[str, str]] | None = None,
) -> str:
    """The text fed to the model for ``question`` in the given style.

    Chat styles need a tokenizer with a chat template; asking for one without it is an error
    rather than a silent fallback, because the style is part of the experiment's settings.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    shots = _fewshot_pairs(fewshot, fewshot_examples)
    if style == "plain":
        blocks = [f"{question_prompt(q)} {a}\n\n" for q, a in shots]
        return "".join(blocks) + question_prompt(question)
    if not has_chat_template(tokenizer):
        raise PolarError(
            f"prompt style {style!r} needs a tokenizer with a chat template; "
            "this tokenizer has none (use --prompt_style plain)"
        )
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for q, a in shots:
        messages += [{"role": "user", "content": question_prompt(q)}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question_prompt(question)})
    extra = {"enable_thinking": False} if style == "chat_nothink" else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)


def completion_answer_text(text: str, style: str = "plain") -> str:
    """The part of a completion that holds the answer: the text after a ``</think>`` block.

    A reasoning block that never closes (generation stopped while thinking) has no answer.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    close = text.rfind("</think>")
    if close >= 0:
        return text[close + len("</think>"):].lstrip()
    if text.lstrip().startswith("<think>"):
        return ""
    return text


def default_prompt_style(
    model_name_or_path: str, model_type: str | None = None, tokenizer: Any = None
) -> str:
    """The reference wrapping for a model (SPEC 4), from its name or config ``model_type``.

    Llama -> ``plain``; Qwen2 / Qwen2.5 / Qwen1.5-MoE -> ``chat``; Qwen3 -> ``chat_nothink``.
    Other models get ``chat`` when their tokenizer has a chat template, else ``plain``.
    """
    name = str(model_name_or_path).lower()
    kind = (model_type or "").lower()
    if "qwen3" in name or kind.startswith("qwen3"):
        return "chat_nothink"
    if "qwen" in name or kind.startswith("qwen2"):
        return "chat"
    if "llama" in name or kind == "llama":
        return "plain"
    return "chat" if has_chat_template(tokenizer) else "plain"
