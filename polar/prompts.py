"""The prompt every question is asked with, and how it is wrapped for each model family.

One prompt text (SPEC 4) asks for the answer inside ``\\boxed{}``. How it reaches the model is a
*style*, recorded in every output file because it changes which programs are correct. The styles
are the release's evaluation wrappings (``polar/eval.py``, ``_online_eval_math_single``):

- ``plain``: the text as is, with the tokenizer's BOS (Llama and every other model). The answer
  is the completion after its last ``Answer:`` (the release splits the decoded text there).
- ``chat``: the chat template with the system prompt "You are a helpful assistant." and the
  generation prompt (Qwen2.5-Instruct, Qwen1.5-MoE-Chat). The answer is the whole completion.
- ``chat_nothink``: the chat template with the user turn only, no system prompt, thinking
  disabled (Qwen3). The answer is the completion after its last ``</think>``, else all of it.

The release's *search* used ``plain`` for every model. Here one style, chosen per model by
:func:`default_prompt_style` or given by ``--prompt_style``, serves search and evaluation alike,
and later steps reuse the style recorded by earlier ones (:func:`choose_prompt_style`).

Few-shot is orthogonal to the style: ``fewshot=N`` puts N short worked examples with boxed
answers in front (as earlier turns in chat styles). It helps tiny models learn the answer format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from polar.errors import PolarError

PROMPT_STYLES = ("plain", "chat", "chat_nothink")
SYSTEM_PROMPT = "You are a helpful assistant."
ANSWER_MARKER = "Answer:"  # the plain answer starts after the last one (the release's split)
THINK_END = "</think>"
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
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if style == "chat" else []
    for q, a in shots:
        messages += [{"role": "user", "content": question_prompt(q)}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question_prompt(question)})
    extra = {"enable_thinking": False} if style == "chat_nothink" else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)


def completion_answer_text(text: str, style: str = "plain") -> str:
    """The part of a completion the answer is read from, cut as the release cuts it.

    ``plain``: after the last ``Answer:`` of the completion (the prompt itself ends with
    ``Answer:``, so a completion without one is used whole). ``chat``: the whole completion.
    ``chat_nothink``: after the last ``</think>``, else the whole completion.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    marker = {"plain": ANSWER_MARKER, "chat_nothink": THINK_END}.get(style)
    if marker is not None:
        cut = text.rfind(marker)
        if cut >= 0:
            text = text[cut + len(marker):]
    return text.strip()


def default_prompt_style(model_name_or_path: str) -> str:
    """The release's wrapping for a model, recognised from its name as the release does.

    Qwen3 -> ``chat_nothink``; Qwen1.5 MoE chat -> ``chat``; Qwen2.5 instruct -> ``chat``;
    anything else (Llama, SmolLM2, Mistral, base models, renamed local copies) -> ``plain``.
    Only the name counts, so search, training, evaluation and ``polar run`` agree before any
    model is loaded; pass ``--prompt_style`` for a renamed local copy of a chat model.
    """
    name = str(model_name_or_path).lower()
    if "qwen3" in name:
        return "chat_nothink"
    if ("qwen1.5" in name or "qwen1_5" in name) and "moe" in name and "chat" in name:
        return "chat"
    if ("qwen2.5" in name or "qwen2_5" in name) and "instruct" in name:
        return "chat"
    return "plain"


def recorded_prompt_style(metadata: Mapping[str, Any] | None) -> str | None:
    """The prompt style an output file says it was made with (``settings.prompt_style``)."""
    if not isinstance(metadata, Mapping):
        return None
    for block in (metadata.get("settings"), metadata):
        if isinstance(block, Mapping) and block.get("prompt_style") in PROMPT_STYLES:
            return str(block["prompt_style"])
    return None


def choose_prompt_style(
    explicit: str | None, recorded: Sequence[tuple[str, str | None]], model_name_or_path: str
) -> str:
    """The style for a step that builds on earlier outputs: the flag, else what they recorded.

    ``recorded`` holds ``(file, style)`` of the inputs (supervision files for training, the
    checkpoint for evaluation); files without a record (e.g. the release's own files) are
    skipped. Inputs made with different styles need the flag, since no single choice matches
    their labels. With nothing recorded, the model's :func:`default_prompt_style`.
    """
    if explicit:
        return explicit
    styles = {style for _, style in recorded if style}
    if len(styles) > 1:
        named = ", ".join(f"{where}: {style}" for where, style in recorded if style)
        raise PolarError(f"inputs were made with different prompt styles ({named}); pass --prompt_style")
    if styles:
        return styles.pop()
    return default_prompt_style(model_name_or_path)
