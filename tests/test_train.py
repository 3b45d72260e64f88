"""Training targets, the release's weighting options (hand-computed), loss, schedule, NaN guard."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import pytest
import torch

from polar.encoders import EncoderSpec, HashEncoder
from polar.errors import PolarError
from polar.train import (
    Batch,
    TrainConfig,
    TrainingSet,
    _on_nan,
    anti_original_penalty,
    batch_loss,
    build_examples,
    cap_examples,
    example_losses,
    lr_factor,
    train_predictor,
)

FULL = [0, 1, 2, 3]
SHORT = [0, 1, 3]  # skip layer 2
LOOP = [0, 0, 1, 2, 3]  # repeat layer 0
BAD = [[3, 2, 1, 0], [0, 1, 1, 1, 2, 3]]  # out of order; a layer three times


@dataclass
class S:
    valid_paths: list
    initial_score: float | None = 1.0
    invalid_paths: list = field(default_factory=list)
    id: str = "x"
    question: str = "q"
    answer: str = "1"


def weights(samples, **flags):
    examples, stats = build_examples(samples, 4, TrainConfig(**flags), random.Random(0))
    return {(e.question, e.length): round(e.weight, 6) for e in examples}, stats, examples


def test_targets_and_unparseable_paths_are_counted():
    _, stats, examples = weights([S([FULL, SHORT, LOOP, *BAD])])
    assert stats.paths == 5 and stats.unparseable == 2 and stats.examples == 3
    by_len = {e.length: e for e in examples}
    # [0,1,3] = keep [0,1] | skip [2] | keep [3]
    assert by_len[3].starts == (1.0, 0.0, 1.0, 1.0) and by_len[3].ops == (1, -100, 0, 1)
    # [0,0,1,2,3] = repeat [0] | keep [1,2,3]
    assert by_len[5].starts == (1.0, 1.0, 0.0, 0.0) and by_len[5].ops == (2, 1, -100, -100)
    assert "2 of 5 paths had no segment parse" in stats.summary()


def test_default_weights_are_one():
    w, _, _ = weights([S([FULL, SHORT, LOOP])])
    assert w == {(0, 4): 1.0, (0, 3): 1.0, (0, 5): 1.0}


def test_per_sample_weight_normalize_divides_by_kept_paths():
    w, _, _ = weights([S([FULL, SHORT, LOOP]), S([SHORT])], per_sample_weight_normalize=True)
    assert w == {(0, 4): 0.333333, (0, 3): 0.333333, (0, 5): 0.333333, (1, 3): 1.0}


def test_reweight_original_only_when_shorter_valid_exists_and_clamped():
    samples = [S([FULL, SHORT]), S([FULL, LOOP])]  # question 1 has no shorter valid path
    w, stats, _ = weights(samples, reweight_original_path_if_shorter_valid=True, original_path_weight=0.3)
    assert w == {(0, 4): 0.3, (0, 3): 1.0, (1, 4): 1.0, (1, 5): 1.0}
    assert stats.originals_reweighted == 1
    assert weights(samples, reweight_original_path_if_shorter_valid=True, original_path_weight=1.7)[0][(0, 4)] == 1.0
    assert weights(samples, reweight_original_path_if_shorter_valid=True, original_path_weight=-2)[0][(0, 4)] == 0.0
    # without the flag the weight option does nothing
    assert weights(samples, original_path_weight=0.3)[0][(0, 4)] == 1.0


def test_drop_original_and_keep_prob():
    samples = [S([FULL, SHORT]), S([FULL, LOOP])]
    w, stats, _ = weights(samples, drop_original_path_if_shorter_valid=True)
    assert (0, 4) not in w and (1, 4) in w and stats.originals_dropped == 1
    w, _, _ = weights(samples, drop_original_path_if_shorter_valid=True, keep_original_prob=1.0)
    assert (0, 4) in w
    # keep_original_prob 0.5 keeps about half over many questions
    many = [S([FULL, SHORT]) for _ in range(400)]
    _, stats, _ = weights(many, drop_original_path_if_shorter_valid=True, keep_original_prob=0.5)
    assert 150 < stats.originals_dropped < 250
    # dropped paths are not counted by per-sample normalisation
    w, _, _ = weights(samples, drop_original_path_if_shorter_valid=True, per_sample_weight_normalize=True)
    assert w[(0, 3)] == 1.0 and w[(1, 5)] == 0.5


def test_lenpref_multiplies_by_exp_minus_beta_length():
    w, _, _ = weights([S([FULL, SHORT, LOOP])], policy_mode="polar_lenpref", lenpref_beta=0.1)
    assert w == {(0, 4): round(math.exp(-0.4), 6), (0, 3): round(math.exp(-0.3), 6), (0, 5): round(math.exp(-0.5), 6)}


def test_max_paths_per_sample_random_subset_seeded():
    paths = [FULL, SHORT, LOOP, [0, 2, 3], [1, 2, 3], [0, 1, 2]]
    first = weights([S(paths)], max_paths_per_sample=2, per_sample_weight_normalize=True)
    again = weights([S(paths)], max_paths_per_sample=2, per_sample_weight_normalize=True)
    assert first[0] == again[0] and len(first[2]) == 2 and set(first[0].values()) == {0.5}
    assert first[1].subsampled_away == 4


def test_anti_flag_from_initial_score_or_invalid_full_path():
    _, _, ex = weights([S([SHORT], initial_score=0.0), S([SHORT], initial_score=1.0),
                        S([SHORT], initial_score=None, invalid_paths=[FULL])])
    assert [e.anti for e in ex] == [True, False, True]


def test_cap_examples():
    items = list(range(10))
    capped = cap_examples(items, 4, random.Random(0))
    assert len(capped) == 4 and capped == sorted(capped) and cap_examples(items, None, random.Random(0)) == items


def test_example_loss_hand_computed():
    # D=3, seg logits [9, 0, 2], starts [1, 0, 1]: layer 0 not trained;
    # BCE(0, y=0) = ln 2, BCE(2, y=1) = ln(1 + e^-2) -> mean of the two.
    seg = torch.tensor([[9.0, 0.0, 2.0]])
    starts = torch.tensor([[1.0, 0.0, 1.0]])
    ops_logits = torch.log(torch.tensor([[[0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]]]))
    ops = torch.tensor([[1, -100, 2]])  # CE at starts 0 and 2: -ln .5, -ln .8
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2 + (-math.log(0.5) - math.log(0.8)) / 2
    assert example_losses(seg, ops_logits, starts, ops).item() == pytest.approx(expected, rel=1e-5)


class Fixed(torch.nn.Module):
    """A stand-in predictor returning given logits, so losses can be computed by hand."""

    def __init__(self, seg, ops):
        super().__init__()
        self.seg, self.ops = seg, ops

    def forward(self, features, mask):
        return self.seg, self.ops


def _batch(weights_, anti):
    b = len(weights_)
    return Batch(torch.zeros(b, 1, 1), torch.ones(b, 1, dtype=torch.bool),
                 torch.tensor([[1.0, 0.0]] * b), torch.tensor([[1, -100]] * b),
                 torch.tensor(weights_), torch.tensor(anti))


def test_weighted_mean_and_anti_original_penalty():
    seg = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    ops = torch.log(torch.tensor([[[0.25, 0.5, 0.25]] * 2, [[0.1, 0.8, 0.1], [0.3, 0.6, 0.1]]]))
    model = Fixed(seg, ops)
    l0 = math.log(2) - math.log(0.5)
    l1 = math.log(1 + math.exp(3)) - math.log(0.8)
    loss, _ = batch_loss(model, _batch([1.0, 3.0], [False, True]), anti_lambda=0.0)
    assert loss.item() == pytest.approx((1 * l0 + 3 * l1) / 4, rel=1e-5)
    # penalty = mean keep prob over layers of anti questions only: (0.8 + 0.6) / 2
    assert anti_original_penalty(ops, torch.tensor([False, True])).item() == pytest.approx(0.7)
    with_penalty, parts = batch_loss(model, _batch([1.0, 3.0], [False, True]), anti_lambda=0.5)
    assert (with_penalty - loss).item() == pytest.approx(0.5 * 0.7, rel=1e-5)
    assert parts["anti_original"] == pytest.approx(0.7)
    no_anti, _ = batch_loss(model, _batch([1.0, 3.0], [False, False]), anti_lambda=0.5)
    assert no_anti.item() == pytest.approx(loss.item())


def test_lr_schedules():
    cfg = TrainConfig(lr_scheduler="cosine", warmup_steps=10)
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1) and lr_factor(9, 110, cfg) == 1.0
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5) and lr_factor(110, 110, cfg) == pytest.approx(0.0)
    assert lr_factor(60, 110, TrainConfig(lr_scheduler="linear", warmup_steps=10)) == pytest.approx(0.5)
    assert lr_factor(100, 110, TrainConfig()) == 1.0


def test_nan_handling():
    with pytest.raises(PolarError, match="--nan_guard"):
        _on_nan(TrainConfig(), 3, 1.0)
    cfg = TrainConfig(nan_guard=True, nan_lr_backoff=0.5, min_lr=2e-5, learning_rate=1e-4)
    assert _on_nan(cfg, 0, 1.0) == 0.5 and _on_nan(cfg, 0, 0.3) == pytest.approx(0.2)
    assert _on_nan(TrainConfig(nan_guard=True), 0, 1.0) == 1.0


def _tiny_sets(nan_question=False):
    enc = HashEncoder(dim=8)
    samples = [S([SHORT], question="alpha one"), S([LOOP], question="beta two"),
               S([FULL], question="gamma"), S([SHORT, FULL], question="alpha three")]
    feats = enc.encode([s.question for s in samples])
    if nan_question:
        feats[2] = torch.full_like(feats[2], float("nan"))
    cfg = TrainConfig(num_epochs=3, batch_size=1, polar_d_model=16, progress=False, nan_guard=nan_question)
    examples, _ = build_examples(samples, 4, cfg, random.Random(0))
    return TrainingSet(feats, examples), cfg


def test_nan_guard_skips_bad_steps(tmp_path):
    data, cfg = _tiny_sets(nan_question=True)
    result = train_predictor(data, None, cfg.predictor_config(4, 8), cfg, tmp_path / "c",
                             EncoderSpec("hash", dim=8), log=lambda *_: None)
    assert result.skipped_nan_steps == 3  # one NaN question, batch 1, three epochs
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


def test_best_checkpoint_by_validation_loss(tmp_path):
    data, cfg = _tiny_sets()
    cfg.num_epochs = 4
    lines = []
    result = train_predictor(data, data, cfg.predictor_config(4, 8), cfg, tmp_path / "c",
                             EncoderSpec("hash", dim=8), meta={"model_path": "m"}, log=lines.append)
    vals = [h["val_loss"] for h in result.history]
    assert result.best_epoch == 1 + vals.index(min(vals)) and result.best_val_loss == min(vals)
    manifest = json.loads((tmp_path / "c.json").read_text())
    assert manifest["training"]["num_epochs"] == 4 and len(manifest["history"]) == 4
    assert manifest["model_path"] == "m" and len(lines) == 4 and "val_loss" in lines[0]


def test_missing_wandb_is_a_clear_error_and_amp_on_cpu_is_noted(tmp_path):
    import importlib.util

    data, cfg = _tiny_sets()
    cfg.num_epochs = 1
    if importlib.util.find_spec("wandb") is None:
        cfg.use_wandb = True
        with pytest.raises(PolarError, match="pip install wandb"):
            train_predictor(data, None, cfg.predictor_config(4, 8), cfg, tmp_path / "c", EncoderSpec("hash", dim=8))
        cfg.use_wandb = False
    cfg.use_amp, cfg.device = True, "cpu"
    lines = []
    train_predictor(data, None, cfg.predictor_config(4, 8), cfg, tmp_path / "c", EncoderSpec("hash", dim=8),
                    log=lines.append)
    assert any("--use_amp has no effect" in line for line in lines)
