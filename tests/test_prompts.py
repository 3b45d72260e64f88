"""Prompt text and wrapping styles, checked against hand-written expected strings."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from polar.errors import PolarError
from polar.math import extract_boxed, is_equivalent
from polar.prompts import (
    FEWSHOT_EXAMPLES,
    PROMPT_STYLES,
    completion_answer_text,
    default_prompt_style,
    format_prompt,
)

SPEC_PROMPT = (
    "Solve the following math problem and output ONLY the final answer directly, formatted "
    "strictly as \\boxed{ANSWER}.\n### Problem Start\nWhat is 1+1?\n### Problem End\nAnswer:"
)

# A tiny chat template in the Qwen3 manner: thinking can be switched off at the generation prompt.
TOY_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = chat_template
    return tok


def test_plain_prompt_is_the_spec_text_exactly():
    assert format_prompt("What is 1+1?", "plain") == SPEC_PROMPT


def test_question_with_braces_is_inserted_verbatim():
    assert "\\frac{1}{2} {x}" in format_prompt("\\frac{1}{2} {x}", "plain")


def test_chat_style_uses_system_prompt_and_generation_prompt():
    text = format_prompt("What is 1+1?", "chat", tokenizer=_tokenizer(TOY_TEMPLATE))
    assert text == f"<|system|>You are a helpful assistant.\n<|user|>{SPEC_PROMPT}\n<|assistant|>"


def test_chat_nothink_disables_thinking():
    text = format_prompt("What is 1+1?", "chat_nothink", tokenizer=_tokenizer(TOY_TEMPLATE))
    assert text.endswith("<|assistant|><think>\n\n</think>\n\n")


def test_chat_style_without_template_is_a_clear_error():
    with pytest.raises(PolarError, match="chat template"):
        format_prompt("q", "chat", tokenizer=_tokenizer(None))
    with pytest.raises(PolarError, match="chat template"):
        format_prompt("q", "chat_nothink", tokenizer=None)


def test_unknown_style_is_rejected():
    with pytest.raises(ValueError, match="prompt style"):
        format_prompt("q", "fancy")


def test_fewshot_plain_prepends_worked_examples():
    text = format_prompt("What is 1+1?", "plain", fewshot=2)
    assert text.endswith(SPEC_PROMPT)
    assert text.count("### Problem Start") == 3
    first_q, first_a = FEWSHOT_EXAMPLES[0]
    assert text.startswith(format_prompt(first_q, "plain") + f" \\boxed{{{first_a}}}\n\n")


def test_fewshot_chat_adds_turns():
    text = format_prompt("What is 1+1?", "chat", tokenizer=_tokenizer(TOY_TEMPLATE), fewshot=1)
    assert text.count("<|user|>") == 2
    assert f"<|assistant|>\\boxed{{{FEWSHOT_EXAMPLES[0][1]}}}\n" in text


def test_fewshot_examples_are_correct_arithmetic():
    expected = {"What is $7 + 5$?": 12, "Compute $6 \\times 8$.": 48, "Solve for $x$: $2x + 3 = 11$.": 4}
    for question, answer in FEWSHOT_EXAMPLES:
        if question in expected:
            assert is_equivalent(answer, str(expected[question]))
    assert is_equivalent(dict(FEWSHOT_EXAMPLES)["What is $\\frac{1}{2} + \\frac{1}{4}$?"], "0.75")


def test_custom_fewshot_examples_and_bounds():
    text = format_prompt("q", "plain", fewshot=1, fewshot_examples=[("What is 2+2?", "4")])
    assert "What is 2+2?" in text and extract_boxed(text.split("\n\n")[0]) == "4"
    with pytest.raises(ValueError, match="fewshot"):
        format_prompt("q", "plain", fewshot=len(FEWSHOT_EXAMPLES) + 1)


@pytest.mark.parametrize(
    "name, model_type, style",
    [
        ("meta-llama/Llama-3.2-3B-Instruct", None, "plain"),
        ("Qwen/Qwen2.5-3B-Instruct", None, "chat"),
        ("Qwen/Qwen1.5-MoE-A2.7B-Chat", None, "chat"),
        ("Qwen/Qwen3-8B", None, "chat_nothink"),
        ("/models/my-finetune", "qwen3", "chat_nothink"),
        ("/models/my-finetune", "qwen2_moe", "chat"),
        ("/models/my-finetune", "llama", "plain"),
        ("/models/unknown", "mistral", "plain"),
    ],
)
def test_default_prompt_style(name, model_type, style):
    assert default_prompt_style(name, model_type) == style
    assert style in PROMPT_STYLES


def test_unknown_model_uses_chat_only_when_it_has_a_template():
    assert default_prompt_style("org/other", None, tokenizer=_tokenizer(TOY_TEMPLATE)) == "chat"
    assert default_prompt_style("org/other", None, tokenizer=_tokenizer(None)) == "plain"


def test_completion_answer_text_drops_the_think_block():
    assert completion_answer_text("<think>hmm \\boxed{1}</think>\n\\boxed{2}", "chat_nothink") == "\\boxed{2}"
    assert completion_answer_text("<think>still thinking \\boxed{1}", "chat_nothink") == ""
    assert completion_answer_text(" \\boxed{3}", "plain") == " \\boxed{3}"
