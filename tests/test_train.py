"""Training as the release does it: which programs become examples (hand-worked cases and an
independent re-implementation of the release's dataset rules), the batch loss, the learning-rate
schedule, NaN back-off, validation loss, checkpoints."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import pytest
import torch

from polar.encoders import EncoderSpec, HashEncoder
from polar.errors import PolarError
from polar.programs import path_to_segments, segment_targets
from polar.train import (
    Batch,
    Example,
    ReleaseLR,
    TrainConfig,
    TrainingSet,
    anti_original_penalty,
    batch_loss,
    build_examples,
    evaluate_loss,
    example_losses,
    examples_from_files,
    lr_factor,
    train_predictor,
)

FULL = [0, 1, 2, 3]
SHORT = [0, 1, 3]  # skip layer 2
LOOP = [0, 0, 1, 2, 3]  # repeat layer 0
BAD = [[3, 2, 1, 0], [0, 1, 1, 1, 2, 3]]  # out of order; a layer three times
SHORT_BAD = [3, 2, 1]  # shorter than D = 4 but has no segment parse


@dataclass
class S:
    valid_paths: list
    initial_score: float | None = 1.0
    invalid_paths: list = field(default_factory=list)
    id: str = "x"
    question: str = "q"
    answer: str = "1"


def weights(samples, limit=None, **flags):
    examples, stats = build_examples(samples, 4, TrainConfig(**flags), random.Random(0), limit)
    return {(e.question, e.length): round(e.weight, 6) for e in examples}, stats, examples


# --------------------------------------------------------------------------- which examples, hand-worked


def test_targets_and_unparseable_paths_are_counted():
    _, stats, examples = weights([S([FULL, SHORT, LOOP, *BAD])])
    assert stats.paths == 5 and stats.unparseable == 2 and stats.examples == 3
    by_len = {e.length: e for e in examples}
    # [0,1,3] = keep [0,1] | skip [2] | keep [3]
    assert by_len[3].starts == (1.0, 0.0, 1.0, 1.0) and by_len[3].ops == (1, -100, 0, 1)
    # [0,0,1,2,3] = repeat [0] | keep [1,2,3]
    assert by_len[5].starts == (1.0, 1.0, 0.0, 0.0) and by_len[5].ops == (2, 1, -100, -100)
    assert "2 had no segment parse" in stats.summary()


def test_default_weights_are_one():
    w, _, _ = weights([S([FULL, SHORT, LOOP])])
    assert w == {(0, 4): 1.0, (0, 3): 1.0, (0, 5): 1.0}


def test_per_sample_weight_normalize_divides_by_the_questions_examples():
    w, _, _ = weights([S([FULL, SHORT, LOOP, BAD[0]]), S([SHORT])], per_sample_weight_normalize=True)
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


def test_reweight_takes_precedence_over_dropping():
    """The release: with reweighting on, the drop options are ignored."""
    w, stats, _ = weights([S([FULL, SHORT])], reweight_original_path_if_shorter_valid=True,
                          original_path_weight=0.5, drop_original_path_if_shorter_valid=True)
    assert w == {(0, 4): 0.5, (0, 3): 1.0} and stats.originals_dropped == 0


def test_drop_original_when_a_shorter_valid_path_exists():
    samples = [S([FULL, SHORT]), S([FULL, LOOP])]
    w, stats, _ = weights(samples, drop_original_path_if_shorter_valid=True)
    assert (0, 4) not in w and (1, 4) in w and stats.originals_dropped == 1
    w, _, _ = weights(samples, drop_original_path_if_shorter_valid=True, keep_original_prob=1.0)
    assert (0, 4) in w
    # dropped paths are not counted by per-sample normalisation
    w, _, _ = weights(samples, drop_original_path_if_shorter_valid=True, per_sample_weight_normalize=True)
    assert w[(0, 3)] == 1.0 and w[(1, 5)] == 0.5


def test_keep_original_prob_alone_enables_dropping():
    many = [S([FULL, SHORT]) for _ in range(400)]
    _, stats, _ = weights(many, keep_original_prob=0.5)  # no drop flag
    assert 150 < stats.originals_dropped < 250
    # the draw is rng.random() < p -> kept, one draw per triggered question: replay it
    rng = random.Random(0)
    expected = sum(1 for _ in many if not rng.random() < 0.5)
    assert stats.originals_dropped == expected
    _, stats, _ = weights(many, keep_original_prob=1.0)
    assert stats.originals_dropped == 0


def test_a_shorter_valid_path_that_does_not_parse_still_triggers():
    """[3, 2, 1] is shorter than D and valid, though it has no segment parse: the full-depth
    path is dropped, and with nothing parseable left the question yields no example."""
    w, stats, _ = weights([S([FULL, SHORT_BAD])], drop_original_path_if_shorter_valid=True)
    assert w == {} and stats.originals_dropped == 1 and stats.unparseable == 1
    assert stats.questions_without_paths == 1
    w, _, _ = weights([S([FULL, SHORT_BAD])], reweight_original_path_if_shorter_valid=True, original_path_weight=0.2)
    assert w == {(0, 4): 0.2}


def test_subsampling_happens_after_dropping():
    """Three valid paths, cap 2: dropping the full-depth one first leaves exactly two, so both
    are kept, whatever the random draws (subsampling first could have lost one of them)."""
    for seed in range(20):
        examples, stats = build_examples([S([FULL, SHORT, LOOP])], 4,
                                         TrainConfig(drop_original_path_if_shorter_valid=True, max_paths_per_sample=2),
                                         random.Random(seed))
        assert sorted(e.length for e in examples) == [3, 5] and stats.subsampled_away == 0


def test_max_paths_per_sample_random_subset_seeded():
    paths = [FULL, SHORT, LOOP, [0, 2, 3], [1, 2, 3], [0, 1, 2]]
    first = weights([S(paths)], max_paths_per_sample=2, per_sample_weight_normalize=True)
    again = weights([S(paths)], max_paths_per_sample=2, per_sample_weight_normalize=True)
    assert first[0] == again[0] and len(first[2]) == 2 and set(first[0].values()) == {0.5}
    assert first[1].subsampled_away == 4
    # the subset is random.Random(seed).sample(paths, cap), in its order
    chosen = random.Random(0).sample(paths, 2)
    assert [e.length for e in first[2]] == [len(p) for p in chosen]


def test_anti_original_flag_is_full_path_not_valid():
    """The release decides from the valid list, not from initial_score or the invalid list; a
    dropped full-depth path still counts as valid."""
    _, _, ex = weights([S([SHORT], initial_score=1.0), S([SHORT, FULL], initial_score=0.0),
                        S([SHORT], initial_score=None, invalid_paths=[FULL])])
    assert [e.anti for e in ex] == [True, False, False, True]
    _, _, ex = weights([S([FULL, SHORT])], drop_original_path_if_shorter_valid=True)
    assert [(e.length, e.anti) for e in ex] == [(3, False)]


def test_example_cap_takes_the_first_examples_of_each_file():
    samples = [S([FULL, SHORT]), S([LOOP, SHORT, FULL]), S([SHORT])]
    w, stats, ex = weights(samples, limit=3)
    assert [(e.question, e.length) for e in ex] == [(0, 4), (0, 3), (1, 5)]
    assert stats.questions_read == 2 and "stopped reading after 2 of 3 questions" in stats.summary()
    # the cut question's weights are normalised over the examples it kept (the release)
    _, _, ex = weights(samples, limit=3, per_sample_weight_normalize=True)
    assert [e.weight for e in ex] == [0.5, 0.5, 1.0]
    # two files: the cap applies to each, and question indices count across files
    both, stats = examples_from_files([samples, samples], 4, TrainConfig(), limit=2)
    assert [(e.question, e.length) for e in both] == [(0, 4), (0, 3), (3, 4), (3, 3)]
    assert stats.questions == 6 and stats.examples == 4


def test_example_caps_must_be_positive():
    with pytest.raises(ValueError, match="--max_total_examples must be at least 1"):
        TrainConfig(max_total_examples=0)
    with pytest.raises(ValueError, match="--max_val_examples"):
        TrainConfig(max_val_examples=-5)


# --------------------------------------------------------------------------- against a re-implementation


def release_dataset(samples, depth, flags, seed, limit):
    """The release's PolarDataset rules, written out independently: [(question index, path,
    weight, anti)] in dataset order."""
    rnd = random.Random(seed)
    original = list(range(depth))
    out = []
    for index, sample in enumerate(samples):
        valid = list(sample.valid_paths)
        has_original = original in valid
        has_shorter = any(p != original and len(p) < depth for p in valid)
        trigger = has_original and has_shorter
        if not flags["reweight"]:
            kp = max(0.0, min(1.0, flags["keep_prob"]))
            if (flags["drop"] or flags["keep_prob"] > 0) and trigger:
                keep = (rnd.random() < kp) if 0.0 < kp < 1.0 else kp >= 1.0
                if not keep:
                    valid = [p for p in valid if p != original]
        if not valid:
            continue
        if len(valid) > flags["cap"]:
            valid = rnd.sample(valid, flags["cap"])
        own = []
        for p in valid:
            if path_to_segments(p, depth) is None:
                continue
            w = max(0.0, min(1.0, flags["weight"])) if (flags["reweight"] and trigger and p == original) else 1.0
            own.append([index, p, w, not has_original])
            if limit is not None and len(out) + len(own) >= limit:
                break
        if not own:
            continue
        if flags["normalize"]:
            for row in own:
                row[2] /= len(own)
        out.extend(own)
        if limit is not None and len(out) >= limit:
            break
    return out


def random_path(rng, depth):
    path = []
    for layer in range(depth):
        path.extend([layer] * rng.choice([0, 1, 1, 1, 2]))
    if rng.random() < 0.1:
        rng.shuffle(path)  # mostly unparseable
    return path or [0]


def test_examples_equal_the_release_rules_on_random_files():
    depth = 6
    for trial in range(60):
        rng = random.Random(trial)
        samples = []
        for _ in range(rng.randint(1, 25)):
            paths = [random_path(rng, depth) for _ in range(rng.randint(0, 8))]
            if rng.random() < 0.5:
                paths.insert(rng.randint(0, len(paths)), list(range(depth)))
            samples.append(S(paths))
        flags = {"drop": rng.random() < 0.5, "keep_prob": rng.choice([0.0, 0.0, 0.3, 1.0, 1.5]),
                 "reweight": rng.random() < 0.3, "weight": rng.choice([0.3, 1.4]),
                 "normalize": rng.random() < 0.5, "cap": rng.choice([1, 2, 3, 50])}
        limit = rng.choice([None, None, 1, 7, 30])
        config = TrainConfig(drop_original_path_if_shorter_valid=flags["drop"], keep_original_prob=flags["keep_prob"],
                             reweight_original_path_if_shorter_valid=flags["reweight"],
                             original_path_weight=flags["weight"], per_sample_weight_normalize=flags["normalize"],
                             max_paths_per_sample=flags["cap"], seed=trial)
        ours, _ = build_examples(samples, depth, config, random.Random(trial), limit)
        expected = release_dataset(samples, depth, flags, trial, limit)
        assert len(ours) == len(expected), (trial, flags, limit)
        for example, (index, path, weight, anti) in zip(ours, expected):
            starts, ops = segment_targets(path_to_segments(path, depth), depth)
            assert (example.question, example.length, example.anti) == (index, len(path), anti)
            assert (example.starts, example.ops) == (tuple(starts), tuple(ops))
            assert example.weight == pytest.approx(weight, abs=1e-12)


# --------------------------------------------------------------------------- loss


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


def _batch(weights_, anti, lengths=None):
    b = len(weights_)
    return Batch(torch.zeros(b, 1, 1), torch.ones(b, 1, dtype=torch.bool),
                 torch.tensor([[1.0, 0.0]] * b), torch.tensor([[1, -100]] * b),
                 torch.tensor(weights_), torch.tensor(anti), torch.tensor(lengths or [2.0] * b))


SEG = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
OPS = torch.log(torch.tensor([[[0.25, 0.5, 0.25]] * 2, [[0.1, 0.8, 0.1], [0.3, 0.6, 0.1]]]))
L0 = math.log(2) - math.log(0.5)
L1 = math.log(1 + math.exp(3)) - math.log(0.8)


def test_weighted_mean_and_anti_original_penalty():
    model = Fixed(SEG, OPS)
    loss, _ = batch_loss(model, _batch([1.0, 3.0], [False, True]), anti_lambda=0.0)
    # weights normalised to mean 1: [0.5, 1.5]; loss = mean(w * l)
    assert loss.item() == pytest.approx((0.5 * L0 + 1.5 * L1) / 2, rel=1e-5)
    # penalty = mean keep prob over layers of anti questions only: (0.8 + 0.6) / 2
    assert anti_original_penalty(OPS, torch.tensor([False, True])).item() == pytest.approx(0.7)
    with_penalty, parts = batch_loss(model, _batch([1.0, 3.0], [False, True]), anti_lambda=0.5)
    assert (with_penalty - loss).item() == pytest.approx(0.5 * 0.7, rel=1e-5)
    assert parts["anti_original"] == pytest.approx(0.7)
    no_anti, _ = batch_loss(model, _batch([1.0, 3.0], [False, False]), anti_lambda=0.5)
    assert no_anti.item() == pytest.approx(loss.item())


def test_lenpref_weights_are_normalised_per_batch():
    """polar_lenpref: w = exp(-beta L) / mean, times the example weights, / mean again."""
    beta, lengths, ex_w = 0.1, [3.0, 7.0], [1.0, 0.5]
    e = [math.exp(-beta * n) for n in lengths]
    e = [x / (sum(e) / 2) for x in e]
    w = [a * b for a, b in zip(e, ex_w)]
    w = [x / (sum(w) / 2) for x in w]
    expected = (w[0] * L0 + w[1] * L1) / 2
    loss, _ = batch_loss(Fixed(SEG, OPS), _batch(ex_w, [False, False], lengths), 0.0, lenpref_beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


class ByFeature(torch.nn.Module):
    """seg logit of layer 1 = the question's single feature; uniform ops."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, features, mask):
        v = features[:, 0, 0]
        return torch.stack([v, v], 1), torch.zeros(len(v), 2, 3)


def test_validation_loss_is_the_mean_over_batches():
    feats = [torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.tensor([[-3.0]])]
    examples = [Example(i, (1.0, 1.0), (1, 1), 1.0, 2, False, False) for i in range(3)]
    # D = 2; per example: BCE(v, 1) at layer 1 + CE(uniform) at both starts = ln(1 + e^-v) + ln 3
    per = [math.log(1 + math.exp(-v)) + math.log(3) for v in (0.0, 2.0, -3.0)]
    got = evaluate_loss(ByFeature(), TrainingSet(feats, examples), TrainConfig(batch_size=2), torch.device("cpu"))
    assert got == pytest.approx(((per[0] + per[1]) / 2 + per[2]) / 2, rel=1e-6)


# --------------------------------------------------------------------------- learning rate


def test_no_scheduler_means_no_warmup():
    cfg = TrainConfig(lr_scheduler="none", warmup_steps=10)
    assert [lr_factor(s, 100, cfg) for s in (0, 5, 50, 100)] == [1.0] * 4


def test_lr_schedules_as_the_release():
    cfg = TrainConfig(lr_scheduler="cosine", warmup_steps=10)
    # warmup step / warmup: the very first batch runs at lr 0
    assert lr_factor(0, 110, cfg) == 0.0 and lr_factor(5, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(10, 110, cfg) == 1.0 and lr_factor(60, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.0)
    assert lr_factor(60, 110, TrainConfig(lr_scheduler="linear", warmup_steps=10)) == pytest.approx(0.5)
    # warmup is capped at total_steps - 1
    long = TrainConfig(lr_scheduler="linear", warmup_steps=50)
    assert lr_factor(4, 10, long) == pytest.approx(4 / 9) and lr_factor(9, 10, long) == pytest.approx(1.0)


def test_nan_lr_backoff_without_scheduler_persists_and_floors_at_min_lr():
    lr = ReleaseLR(TrainConfig(learning_rate=1e-3, nan_guard=True, nan_lr_backoff=0.5, min_lr=2e-4), 100)
    values = []
    for event in ("step", "nan", "step", "nan", "nan", "step"):
        lr.back_off() if event == "nan" else lr.after_update()
        values.append(lr.value)
    assert values == pytest.approx([1e-3, 5e-4, 5e-4, 2.5e-4, 2e-4, 2e-4])


def test_nan_lr_backoff_with_scheduler_lasts_until_the_next_update():
    cfg = TrainConfig(learning_rate=1.0, lr_scheduler="linear", nan_guard=True, nan_lr_backoff=0.5)
    lr = ReleaseLR(cfg, 4)
    assert lr.value == 1.0
    lr.back_off()  # skipped batch: the schedule does not advance
    assert lr.value == 0.5
    lr.after_update()  # the scheduler recomputes 1.0 * (1 - 1/4)
    assert lr.value == pytest.approx(0.75)
    # during warmup (lr 0) the floor lifts the lr to min_lr, as max(min_lr, lr * f) does
    warm = ReleaseLR(TrainConfig(lr_scheduler="cosine", warmup_steps=5, nan_guard=True, nan_lr_backoff=0.5,
                                 min_lr=1e-6), 50)
    assert warm.value == 0.0
    warm.back_off()
    assert warm.value == 1e-6
    # a factor outside (0, 1) does nothing
    same = ReleaseLR(TrainConfig(nan_guard=True, nan_lr_backoff=1.5), 10)
    same.back_off()
    assert same.value == 1e-4


# --------------------------------------------------------------------------- the loop


def _tiny_sets(nan_question=False, **flags):
    enc = HashEncoder(dim=8)
    samples = [S([SHORT], question="alpha one"), S([LOOP], question="beta two"),
               S([FULL], question="gamma"), S([SHORT, FULL], question="alpha three")]
    feats = enc.encode([s.question for s in samples])
    if nan_question:
        feats[2] = torch.full_like(feats[2], float("nan"))
    cfg = TrainConfig(num_epochs=3, batch_size=1, polar_d_model=16, progress=False, nan_guard=nan_question, **flags)
    examples, _ = build_examples(samples, 4, cfg, random.Random(0))
    return TrainingSet(feats, examples), cfg


def _record_lrs(monkeypatch) -> list[float]:
    seen: list[float] = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    return seen


def test_the_loop_follows_the_release_schedule(monkeypatch, tmp_path):
    """5 examples, batch 1, 3 epochs = 15 steps; linear, warmup 2: 0, .5, then 1 - k/13."""
    seen = _record_lrs(monkeypatch)
    data, cfg = _tiny_sets(lr_scheduler="linear", warmup_steps=2)
    cfg.learning_rate = 0.1
    train_predictor(data, None, cfg.predictor_config(4, 8), cfg, tmp_path / "c", EncoderSpec("hash", dim=8),
                    log=lambda *_: None)
    expected = [0.0, 0.05] + [0.1 * (1 - k / 13) for k in range(13)]
    assert seen == pytest.approx(expected)


def test_skipped_nan_batches_do_not_advance_the_schedule(monkeypatch, tmp_path):
    seen = _record_lrs(monkeypatch)
    data, cfg = _tiny_sets(nan_question=True, lr_scheduler="linear", nan_lr_backoff=0.5)
    cfg.learning_rate = 0.1
    result = train_predictor(data, None, cfg.predictor_config(4, 8), cfg, tmp_path / "c",
                             EncoderSpec("hash", dim=8), log=lambda *_: None)
    assert result.skipped_nan_steps == 3 and len(seen) == 12
    scheduled = [0.1 * (1 - k / 15) for k in range(12)]  # the k-th update sees the k-th value
    halved = [abs(lr - s / 2) < 1e-12 for lr, s in zip(seen, scheduled)]
    assert all(h or abs(lr - s) < 1e-12 for h, lr, s in zip(halved, seen, scheduled))
    assert 1 <= sum(halved) <= 3  # the update right after each skip (none after a final one)


def test_nan_loss_stops_with_a_hint_without_nan_guard(tmp_path):
    data, cfg = _tiny_sets(nan_question=True)
    cfg.nan_guard = False
    with pytest.raises(PolarError, match="--nan_guard"):
        train_predictor(data, None, cfg.predictor_config(4, 8), cfg, tmp_path / "c", EncoderSpec("hash", dim=8),
                        log=lambda *_: None)


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
    assert manifest["complete"] is True and manifest["predictor"]["arch"] == "release"


def test_an_interrupted_training_leaves_an_unfinished_checkpoint(tmp_path):
    data, cfg = _tiny_sets()

    def stop_after_first_epoch(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_predictor(data, data, cfg.predictor_config(4, 8), cfg, tmp_path / "c", EncoderSpec("hash", dim=8),
                        log=stop_after_first_epoch)
    assert json.loads((tmp_path / "c.json").read_text())["complete"] is False


def test_prenorm_arch_trains_and_is_recorded(tmp_path):
    data, cfg = _tiny_sets(predictor_arch="prenorm")
    cfg.num_epochs = 1
    train_predictor(data, None, cfg.predictor_config(4, 8), cfg, tmp_path / "c", EncoderSpec("hash", dim=8),
                    log=lambda *_: None)
    assert json.loads((tmp_path / "c.json").read_text())["predictor"]["arch"] == "prenorm"


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
def test_amp_is_fp16_with_a_scaler_or_bf16_without():
    from polar.train import _amp

    cuda = torch.device("cuda")
    context, scaler = _amp(TrainConfig(use_amp=True), cuda)
    assert context.fast_dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    context, scaler = _amp(TrainConfig(use_amp=True, amp_dtype="bf16"), cuda)
    assert context.fast_dtype == torch.bfloat16 and scaler is None
    assert _amp(TrainConfig(), cuda)[1] is None and _amp(TrainConfig(use_amp=True), torch.device("cpu"))[1] is None
    with pytest.raises(ValueError, match="amp_dtype"):
        TrainConfig(amp_dtype="fp8")


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


# --------------------------------------------------------------------------- identity


def test_weight_identity_leaves_out_logging_and_inert_settings():
    base = TrainConfig().weight_identity()
    assert "use_wandb" not in base and "device" not in base and "progress" not in base
    assert TrainConfig(learning_rate=5e-4).weight_identity() != base
    # settings the release ignores in this combination do not count
    assert TrainConfig(lenpref_beta=0.2).weight_identity() == base
    assert TrainConfig(warmup_steps=10).weight_identity() == base
    assert TrainConfig(original_path_weight=0.3).weight_identity() == base
    assert TrainConfig(nan_lr_backoff=0.5, min_lr=1e-6).weight_identity() == base
    assert TrainConfig(amp_dtype="bf16").weight_identity() == base
    assert TrainConfig(policy_mode="polar_lenpref", lenpref_beta=0.2).weight_identity() != \
        TrainConfig(policy_mode="polar_lenpref").weight_identity()
    assert TrainConfig(lr_scheduler="cosine", warmup_steps=10).weight_identity() != \
        TrainConfig(lr_scheduler="cosine").weight_identity()
    reweight = dict(reweight_original_path_if_shorter_valid=True)
    assert TrainConfig(**reweight, drop_original_path_if_shorter_valid=True).weight_identity() == \
        TrainConfig(**reweight).weight_identity()
