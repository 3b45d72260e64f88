"""Shared fixtures: tiny random-weight models built from real architectures' configs."""

from __future__ import annotations

import logging
import sys

import pytest
import torch


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the moment of writing."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def _library_logs_follow_capture():
    """transformers gives its logger a stream handler bound to ``sys.stderr`` as it is when the
    library first logs; under pytest that is one test's capture, closed when the test ends, and
    every later warning would print a "Logging error" traceback into another test's stderr. The
    handler writes to the current ``sys.stderr`` instead, so results do not depend on test order."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # the library's handler exists from here on
    for handler in logging.getLogger("transformers").handlers:
        if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _CurrentStderr):
            handler.stream = _CurrentStderr()  # plain assignment: flushing the old stream may fail
    yield


TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def tiny_config(arch: str):
    """A small config of the named architecture (random weights are built from it)."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY)
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=16)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, decoder_sparse_step=1,
        )
    if arch == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype, attn_implementation="sdpa")
    # Random init of some modules (e.g. norms) is near-identity; perturb everything so that
    # layers are clearly distinguishable and a wrong layer order shows up in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


ARCHS = ["llama", "qwen2", "qwen2_moe", "qwen3", "mistral"]


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 6-layer random-weight Llama with a byte-level tokenizer, saved like a hub checkout."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=vocab["<eos>"], pad_token_id=vocab["<eos>"], bos_token_id=None,
    )
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
