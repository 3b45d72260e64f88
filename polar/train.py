"""Training the predictor from search output, with the release's weighting options.

Every valid program of a question becomes one training example: its segmentation form
(:func:`polar.programs.path_to_segments`) gives a segment-start target per layer and an op target
at each segment start. Examples carry a weight (see :func:`build_examples` for the options and the
order they apply in); the loss of a batch is the weighted mean of per-example losses
``BCE(seg, layers 1..D-1) + CE(op, at segment starts)``, plus the optional anti-original penalty.
The checkpoint with the lowest validation loss is kept (the last epoch with ``no_validation``).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from polar.encoders import EncoderSpec
from polar.errors import PolarError
from polar.predictor import PolarPredictor, PredictorConfig, pad_features, save_checkpoint
from polar.programs import IGNORE_INDEX, KEEP, full_program, path_to_segments, segment_targets

POLICY_MODES = ("polar", "polar_lenpref")
SCHEDULERS = ("none", "linear", "cosine")


@dataclass
class TrainConfig:
    """The release's training flags (same names and defaults as ``run_polar.py``)."""

    policy_mode: str = "polar"
    num_epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 1e-4
    seed: int = 42
    no_validation: bool = False
    max_paths_per_sample: int | None = 50
    max_total_examples: int | None = None
    max_val_examples: int | None = 20000
    polar_d_model: int = 256
    polar_heads: int = 4
    polar_layers: int = 2
    dropout: float = 0.1
    lenpref_beta: float = 0.05
    drop_original_path_if_shorter_valid: bool = False
    keep_original_prob: float = 0.0
    reweight_original_path_if_shorter_valid: bool = False
    original_path_weight: float = 1.0
    anti_original_lambda: float = 0.0
    per_sample_weight_normalize: bool = False
    lr_scheduler: str = "none"
    warmup_steps: int = 0
    nan_guard: bool = False
    nan_lr_backoff: float = 0.0
    min_lr: float = 0.0
    grad_clip_norm: float = 0.0
    use_amp: bool = False
    optimizer_eps: float = 1e-8
    weight_decay: float = 0.0
    use_wandb: bool = False
    wandb_project: str = "mcts_reward_predictor"
    wandb_run_name: str | None = None
    wandb_entity: str | None = None
    wandb_dir: str | None = None
    tensorboard_dir: str | None = None
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.policy_mode not in POLICY_MODES:
            raise ValueError(f"policy_mode must be one of {POLICY_MODES}, got {self.policy_mode!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.num_epochs < 1 or self.batch_size < 1:
            raise ValueError("num_epochs and batch_size must be at least 1")

    def predictor_config(self, num_layers: int, encoder_dim: int) -> PredictorConfig:
        return PredictorConfig(
            num_layers, encoder_dim, self.polar_d_model, self.polar_heads, self.polar_layers, self.dropout
        )


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One (question, program) training pair in segmentation form."""

    question: int  # index into the question list / feature list
    starts: tuple[float, ...]
    ops: tuple[int, ...]
    weight: float
    length: int  # executed layers of the program
    is_original: bool
    anti: bool  # the full-depth program is wrong on this question


@dataclass
class ExampleStats:
    """Counts reported to the user: nothing is dropped silently."""

    questions: int = 0
    questions_without_paths: int = 0
    paths: int = 0
    unparseable: int = 0
    subsampled_away: int = 0
    originals_dropped: int = 0
    originals_reweighted: int = 0
    examples: int = 0

    def summary(self) -> str:
        return (
            f"{self.examples} examples from {self.questions} questions; {self.unparseable} of "
            f"{self.paths} paths had no segment parse (dropped), {self.subsampled_away} left out by "
            f"max_paths_per_sample, {self.originals_dropped} full-depth paths dropped, "
            f"{self.originals_reweighted} reweighted, {self.questions_without_paths} questions "
            "without a usable path"
        )


def build_examples(
    samples: Sequence[Any], num_layers: int, config: TrainConfig, rng: random.Random
) -> tuple[list[Example], ExampleStats]:
    """Turn samples' valid paths into weighted examples.

    Per question, in this order: unparseable paths are dropped (counted); at most
    ``max_paths_per_sample`` paths are kept (random subset); when a valid path shorter than the
    full depth exists, the full-depth path is dropped (``drop_original_path_if_shorter_valid``,
    surviving with ``keep_original_prob``) and/or weighted ``original_path_weight`` clamped to
    [0, 1] (``reweight_original_path_if_shorter_valid``); ``polar_lenpref`` multiplies by
    ``exp(-lenpref_beta * length)``; ``per_sample_weight_normalize`` divides by the number of
    paths kept for that question.
    """
    stats = ExampleStats(questions=len(samples))
    full = full_program(num_layers)
    examples: list[Example] = []
    for q, sample in enumerate(samples):
        parsed = []
        for path in sample.valid_paths:
            stats.paths += 1
            segments = path_to_segments(path, num_layers)
            if segments is None:
                stats.unparseable += 1
            else:
                parsed.append((list(path), segments))
        shorter_exists = any(len(p) < num_layers for p, _ in parsed)
        cap = config.max_paths_per_sample
        if cap is not None and cap > 0 and len(parsed) > cap:
            stats.subsampled_away += len(parsed) - cap
            parsed = rng.sample(parsed, cap)
        weighted = []
        for path, segments in parsed:
            weight = 1.0
            if path == full and shorter_exists:
                if config.drop_original_path_if_shorter_valid and rng.random() >= config.keep_original_prob:
                    stats.originals_dropped += 1
                    continue
                if config.reweight_original_path_if_shorter_valid:
                    weight = min(1.0, max(0.0, config.original_path_weight))
                    stats.originals_reweighted += 1
            if config.policy_mode == "polar_lenpref":
                weight *= math.exp(-config.lenpref_beta * len(path))
            weighted.append((path, segments, weight))
        if not weighted:
            stats.questions_without_paths += 1
            continue
        anti = _full_depth_wrong(sample, full)
        for path, segments, weight in weighted:
            if config.per_sample_weight_normalize:
                weight /= len(weighted)
            starts, ops = segment_targets(segments, num_layers)
            examples.append(Example(q, tuple(starts), tuple(ops), weight, len(path), path == full, anti))
    stats.examples = len(examples)
    return examples, stats


def _full_depth_wrong(sample: Any, full: list[int]) -> bool:
    """True when search found the full-depth program wrong on this question."""
    score = getattr(sample, "initial_score", None)
    if score is not None:
        return float(score) == 0.0
    return any(list(p) == full for p in (getattr(sample, "invalid_paths", None) or []))


def cap_examples(examples: list[Example], cap: int | None, rng: random.Random) -> list[Example]:
    """A random subset of at most ``cap`` examples (order preserved); ``None``/0 = no cap."""
    if not cap or len(examples) <= cap:
        return examples
    keep = sorted(rng.sample(range(len(examples)), cap))
    return [examples[i] for i in keep]


# --------------------------------------------------------------------------- loss


@dataclass
class Batch:
    features: torch.Tensor  # [B, T, E]
    mask: torch.Tensor  # [B, T]
    starts: torch.Tensor  # [B, D] float
    ops: torch.Tensor  # [B, D] long, IGNORE_INDEX inside segments
    weights: torch.Tensor  # [B]
    anti: torch.Tensor  # [B] bool

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.features, self.mask, self.starts, self.ops, self.weights, self.anti)))


def collate(examples: Sequence[Example], features: Sequence[torch.Tensor]) -> Batch:
    padded, mask = pad_features([features[e.question] for e in examples])
    return Batch(
        padded,
        mask,
        torch.tensor([e.starts for e in examples], dtype=torch.float32),
        torch.tensor([e.ops for e in examples], dtype=torch.long),
        torch.tensor([e.weight for e in examples], dtype=torch.float32),
        torch.tensor([e.anti for e in examples], dtype=torch.bool),
    )


def example_losses(
    seg_logits: torch.Tensor, op_logits: torch.Tensor, starts: torch.Tensor, ops: torch.Tensor
) -> torch.Tensor:
    """Per example: mean BCE over segment starts of layers 1..D-1 (layer 0 always starts one)
    plus mean CE of the op over the example's segment starts."""
    seg_logits, op_logits = seg_logits.float(), op_logits.float()
    if seg_logits.shape[1] > 1:
        bce = F.binary_cross_entropy_with_logits(seg_logits[:, 1:], starts[:, 1:], reduction="none").mean(1)
    else:
        bce = seg_logits.new_zeros(seg_logits.shape[0])
    ce_all = F.cross_entropy(op_logits.transpose(1, 2), ops, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (ops != IGNORE_INDEX).float()
    ce = (ce_all * valid).sum(1) / valid.sum(1).clamp(min=1.0)
    return bce + ce


def anti_original_penalty(op_logits: torch.Tensor, anti: torch.Tensor) -> torch.Tensor:
    """Mean probability of "keep" over all layers, averaged over questions whose full-depth
    program is wrong: pushes the predictor away from reproducing the failing original."""
    if not bool(anti.any()):
        return op_logits.new_zeros(())
    keep = torch.softmax(op_logits.float(), dim=-1)[..., KEEP].mean(1)
    return keep[anti].mean()


def batch_loss(
    model: PolarPredictor, batch: Batch, anti_lambda: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted mean example loss plus ``anti_lambda`` times the anti-original penalty."""
    seg, ops = model(batch.features, batch.mask)
    per_example = example_losses(seg, ops, batch.starts, batch.ops)
    supervised = (per_example * batch.weights).sum() / batch.weights.sum().clamp(min=1e-12)
    loss = supervised
    parts = {"supervised": float(supervised.detach())}
    if anti_lambda:
        penalty = anti_original_penalty(ops, batch.anti)
        loss = loss + anti_lambda * penalty
        parts["anti_original"] = float(penalty.detach())
    return loss, parts


# --------------------------------------------------------------------------- loop


@dataclass
class TrainingSet:
    """Question features plus the examples that point into them."""

    features: list[torch.Tensor]
    examples: list[Example]
    stats: ExampleStats = field(default_factory=ExampleStats)


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_val_loss: float | None
    history: list[dict[str, float]]
    skipped_nan_steps: int


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Warmup (linear from 1/warmup to 1) then none / linear / cosine decay to 0."""
    warm = config.warmup_steps
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if config.lr_scheduler == "none":
        return 1.0
    progress = (step - warm) / max(1, total_steps - warm)
    progress = min(1.0, max(0.0, progress))
    if config.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(examples: list[Example], batch_size: int, generator: torch.Generator | None) -> list[list[Example]]:
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    ordered = [examples[i] for i in order]
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def evaluate_loss(model: PolarPredictor, data: TrainingSet, config: TrainConfig, device: torch.device) -> float:
    """Validation loss: the training objective averaged over batches, weighted by batch weight."""
    model.eval()
    total, weight = 0.0, 0.0
    for chunk in _batches(data.examples, max(config.batch_size, 64), None):
        batch = collate(chunk, data.features).to(device)
        loss, _ = batch_loss(model, batch, config.anti_original_lambda)
        w = float(batch.weights.sum())
        total += float(loss.detach()) * w
        weight += w
    return total / weight if weight else float("nan")


def check_logging_available(config: TrainConfig) -> None:
    """Fail before any expensive work when a requested logging backend is not installed."""
    import importlib.util

    if config.use_wandb and importlib.util.find_spec("wandb") is None:
        raise PolarError("--use_wandb needs the wandb package (pip install wandb)")
    if config.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise PolarError("--tensorboard_dir needs the tensorboard package (pip install tensorboard)")


class _Logger:
    """Optional wandb / tensorboard sinks; a missing package is a clear error, not a crash later."""

    def __init__(self, config: TrainConfig, run_config: dict[str, Any]) -> None:
        self.wandb = None
        self.tensorboard = None
        if config.use_wandb:
            try:
                import wandb
            except ImportError:
                raise PolarError("--use_wandb needs the wandb package (pip install wandb)") from None
            try:
                self.wandb = wandb.init(
                    project=config.wandb_project, name=config.wandb_run_name, entity=config.wandb_entity,
                    dir=config.wandb_dir, config=run_config, settings=wandb.Settings(init_timeout=60),
                )
            except Exception as err:  # wandb raises many types when offline or unauthenticated
                raise PolarError(
                    f"wandb could not start ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                    "set WANDB_MODE=offline or drop --use_wandb"
                ) from None
        if config.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise PolarError("--tensorboard_dir needs the tensorboard package (pip install tensorboard)") from None
            self.tensorboard = SummaryWriter(config.tensorboard_dir)

    def log(self, values: dict[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _amp_context(config: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA (no loss scaler needed); elsewhere a no-op."""
    import contextlib

    if config.use_amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_predictor(
    train: TrainingSet,
    val: TrainingSet | None,
    predictor_config: PredictorConfig,
    config: TrainConfig,
    checkpoint_path: str | Path,
    encoder: EncoderSpec,
    meta: dict[str, Any] | None = None,
    log=print,
) -> TrainResult:
    """Train a fresh predictor and write the best checkpoint to ``checkpoint_path``."""
    if not train.examples:
        raise PolarError("no training examples: every question lacked a parseable valid path")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.use_amp and device.type != "cuda":
        log("note: --use_amp has no effect without a CUDA device; training in float32")
    torch.manual_seed(config.seed)
    model = PolarPredictor(predictor_config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, eps=config.optimizer_eps, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(train.examples) / config.batch_size)
    total_steps = steps_per_epoch * config.num_epochs
    use_val = val is not None and bool(val.examples) and not config.no_validation
    logger = _Logger(config, asdict(config))
    meta = dict(meta or {})
    meta["training"] = asdict(config)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    lr_scale, step, skipped = 1.0, 0, 0
    try:
        for epoch in range(1, config.num_epochs + 1):
            model.train()
            started = time.perf_counter()
            total, weight = 0.0, 0.0
            bar = _progress(_batches(train.examples, config.batch_size, generator), epoch, config)
            for chunk in bar:
                lr = config.learning_rate * lr_scale * lr_factor(step, total_steps, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = collate(chunk, train.features).to(device)
                with _amp_context(config, device):
                    loss, parts = batch_loss(model, batch, config.anti_original_lambda)
                optimizer.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):
                    skipped += 1
                    lr_scale = _on_nan(config, step, lr_scale)
                    step += 1
                    continue
                loss.backward()
                if config.grad_clip_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                    if not torch.isfinite(norm):
                        optimizer.zero_grad(set_to_none=True)
                        skipped += 1
                        lr_scale = _on_nan(config, step, lr_scale)
                        step += 1
                        continue
                optimizer.step()
                w = float(batch.weights.sum())
                total += float(loss.detach()) * w
                weight += w
                step += 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lr:.2e}")
                logger.log({"train/loss": float(loss.detach()), "train/lr": lr, **{f"train/{k}": v for k, v in parts.items()}}, step)
            train_loss = total / weight if weight else float("nan")
            val_loss = evaluate_loss(model, val, config, device) if use_val else None
            record = {"epoch": epoch, "train_loss": train_loss, "seconds": time.perf_counter() - started}
            if val_loss is not None:
                record["val_loss"] = val_loss
            history.append(record)
            logger.log({k: v for k, v in record.items() if k != "epoch"}, step)
            key = val_loss if use_val else -epoch  # without validation the last epoch wins
            improved = best is None or key < best[0]
            if improved:
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                best = (key, epoch, state)
                _save(checkpoint_path, model, state, encoder, meta, history)
            val_text = f" val_loss {val_loss:.4f}" if val_loss is not None else ""
            log(f"epoch {epoch}/{config.num_epochs}: train_loss {train_loss:.4f}{val_text}"
                f"{' (best, saved)' if improved else ''}")
    finally:
        logger.close()
    assert best is not None
    _save(checkpoint_path, model, best[2], encoder, meta, history)  # final JSON carries full history
    return TrainResult(Path(checkpoint_path), best[1], best[0] if use_val else None, history, skipped)


def _on_nan(config: TrainConfig, step: int, lr_scale: float) -> float:
    """Skip a non-finite step under ``nan_guard`` (backing off the lr), else stop with a hint."""
    if not config.nan_guard:
        raise PolarError(f"training loss became NaN/inf at step {step}; rerun with --nan_guard "
                         "(and --nan_lr_backoff) or a lower --learning_rate")
    if config.nan_lr_backoff > 0:
        floor = config.min_lr / config.learning_rate if config.learning_rate > 0 else 0.0
        lr_scale = max(lr_scale * config.nan_lr_backoff, floor)
    return lr_scale


def _save(path, model, state, encoder, meta, history) -> None:
    live = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    try:
        save_checkpoint(path, model, encoder, {**meta, "history": history})
    finally:
        model.load_state_dict(live)


def _progress(batches: list, epoch: int, config: TrainConfig):
    if not config.progress:
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=f"epoch {epoch}/{config.num_epochs}", leave=False, file=sys.stderr)
