"""Training the predictor from search output, with the release's semantics.

Every valid program of a question becomes one training example: its segmentation form
(:func:`polar.programs.path_to_segments`) gives a segment-start target per layer and an op target
at each segment start. Which programs become examples, and their weights, follow the release's
``PolarDataset`` (see :func:`build_examples`); the loss of a batch is the release's:
per-example ``BCE(seg, layers 1..D-1) + CE(op, at segment starts)``, weighted by the example
weights (times ``exp(-beta * length)`` for ``polar_lenpref``) normalised to mean 1 within the
batch, plus ``anti_original_lambda`` times the anti-original penalty. The learning rate, warmup,
NaN back-off, AMP and validation loss follow the release's loop too (see :class:`ReleaseLR`,
:func:`evaluate_loss`). The checkpoint with the lowest validation loss is kept (the last epoch
with ``no_validation``).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from polar.encoders import EncoderSpec
from polar.errors import PolarError
from polar.predictor import PREDICTOR_ARCHS, Predictor, PredictorConfig, build_predictor, pad_features, save_checkpoint
from polar.programs import IGNORE_INDEX, KEEP, full_program, path_to_segments, segment_targets

POLICY_MODES = ("polar", "polar_lenpref")
SCHEDULERS = ("none", "linear", "cosine")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# TrainConfig fields that do not change the trained weights: where progress goes, not what is learned
_NOT_WEIGHT_FIELDS = frozenset({
    "use_wandb", "wandb_project", "wandb_run_name", "wandb_entity", "wandb_dir", "tensorboard_dir",
    "device", "progress",
})


@dataclass
class TrainConfig:
    """The release's training flags (same names and defaults as ``run_polar.py``), plus
    ``predictor_arch`` and ``amp_dtype``."""

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
    predictor_arch: str = "release"
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
    amp_dtype: str = "fp16"
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
        if self.predictor_arch not in PREDICTOR_ARCHS:
            raise ValueError(f"predictor_arch must be one of {PREDICTOR_ARCHS}, got {self.predictor_arch!r}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {tuple(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if self.num_epochs < 1 or self.batch_size < 1:
            raise ValueError("num_epochs and batch_size must be at least 1")
        for name in ("max_total_examples", "max_val_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1 (leave it out for no cap), got {value}")

    def predictor_config(self, num_layers: int, encoder_dim: int) -> PredictorConfig:
        return PredictorConfig(
            num_layers, encoder_dim, self.polar_d_model, self.polar_heads, self.polar_layers, self.dropout,
            self.predictor_arch,
        )

    def weight_identity(self) -> dict[str, Any]:
        """The settings that change the trained weights, for naming and comparing checkpoints.

        Logging and device fields are left out. Settings the release ignores in the given
        combination are set to ``None``, so changing them does not force a retrain: ``lenpref_beta``
        outside ``polar_lenpref``; ``original_path_weight`` without the reweight flag; the drop
        options under reweighting (it takes precedence); ``warmup_steps`` with no scheduler;
        ``nan_lr_backoff`` / ``min_lr`` without ``nan_guard``; ``amp_dtype`` without AMP;
        ``max_val_examples`` without validation.
        """
        values = {k: v for k, v in asdict(self).items() if k not in _NOT_WEIGHT_FIELDS}
        inert = []
        if self.policy_mode != "polar_lenpref":
            inert.append("lenpref_beta")
        if not self.reweight_original_path_if_shorter_valid:
            inert.append("original_path_weight")
        else:
            inert += ["drop_original_path_if_shorter_valid", "keep_original_prob"]
        if self.lr_scheduler == "none":
            inert.append("warmup_steps")
        if not self.nan_guard:
            inert += ["nan_lr_backoff", "min_lr"]
        if not self.use_amp:
            inert.append("amp_dtype")
        if self.no_validation:
            inert.append("max_val_examples")
        return {k: (None if k in inert else v) for k, v in values.items()}


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One (question, program) training pair in segmentation form."""

    question: int  # index into the question list / feature list
    starts: tuple[float, ...]
    ops: tuple[int, ...]
    weight: float  # original-path reweighting x per-question normalisation (lenpref is applied per batch)
    length: int  # executed layers of the program
    is_original: bool
    anti: bool  # the full-depth program is not among the question's valid programs


@dataclass
class ExampleStats:
    """Counts reported to the user: nothing is dropped silently."""

    questions: int = 0
    questions_read: int = 0
    questions_without_paths: int = 0
    paths: int = 0
    originals_dropped: int = 0
    subsampled_away: int = 0
    unparseable: int = 0
    originals_reweighted: int = 0
    examples: int = 0
    example_cap: int | None = None

    def summary(self) -> str:
        capped = ""
        if self.questions_read < self.questions:
            capped = (f"; the cap of {self.example_cap} examples stopped reading after "
                      f"{self.questions_read} of {self.questions} questions")
        return (
            f"{self.examples} examples from {self.questions_read} questions; of {self.paths} valid "
            f"paths {self.originals_dropped} full-depth paths were dropped, {self.subsampled_away} left "
            f"out by max_paths_per_sample and {self.unparseable} had no segment parse; "
            f"{self.originals_reweighted} reweighted, {self.questions_without_paths} questions "
            f"without a usable path{capped}"
        )

    def add(self, other: "ExampleStats") -> None:
        for name, value in asdict(other).items():
            if name != "example_cap":
                setattr(self, name, getattr(self, name) + value)


def _drop_originals(paths: list[list[int]], full: list[int], trigger: bool, config: TrainConfig,
                    rng: random.Random) -> list[list[int]]:
    """The release's drop rule: enabled by the drop flag or by ``keep_original_prob > 0`` alone;
    applies only when the full-depth path and a shorter one are both valid. The probability is
    clamped to [0, 1]; strictly between, one draw decides (kept when ``rng.random() < p``);
    otherwise the full-depth path is kept only at ``p >= 1``. Every copy of it goes together."""
    enabled = config.drop_original_path_if_shorter_valid or config.keep_original_prob > 0.0
    if not enabled or not trigger:
        return paths
    keep_prob = min(1.0, max(0.0, float(config.keep_original_prob)))
    if 0.0 < keep_prob < 1.0:
        keep = rng.random() < keep_prob
    else:
        keep = keep_prob >= 1.0
    return paths if keep else [p for p in paths if p != full]


def build_examples(
    samples: Sequence[Any], num_layers: int, config: TrainConfig, rng: random.Random,
    limit: int | None = None,
) -> tuple[list[Example], ExampleStats]:
    """Turn one supervision file's samples into weighted examples, as the release's
    ``PolarDataset`` does (one ``rng``, seeded with the training seed, per file and split).

    Per question, in file order:

    1. "a shorter valid path exists" = some valid path other than the full-depth one is shorter
       than ``D``, whether or not it parses; with the full-depth path also valid this *triggers*
       the original-path options;
    2. with ``reweight_original_path_if_shorter_valid`` nothing is dropped and, when triggered,
       every full-depth example gets weight ``original_path_weight`` clamped to [0, 1];
       otherwise the drop rule of :func:`_drop_originals` applies;
    3. more than ``max_paths_per_sample`` paths left -> a random subset (``rng.sample``; its
       order is kept); ``None`` or 0 means no cap;
    4. paths with no segment parse are skipped (counted);
    5. ``per_sample_weight_normalize`` divides the question's weights by its example count;
    6. the anti-original flag is set when the full-depth path is not among the valid ones.

    ``limit`` (``max_total_examples`` / ``max_val_examples``) keeps the first ``limit`` examples
    of the file: reading stops at the example that reaches it.
    """
    stats = ExampleStats(questions=len(samples), example_cap=limit)
    full = full_program(num_layers)
    examples: list[Example] = []
    for q, sample in enumerate(samples):
        stats.questions_read += 1
        paths = [list(p) for p in sample.valid_paths]
        stats.paths += len(paths)
        has_original = any(p == full for p in paths)
        has_shorter = any(len(p) < num_layers for p in paths)  # full has num_layers layers
        trigger = has_original and has_shorter
        if not config.reweight_original_path_if_shorter_valid:
            kept = _drop_originals(paths, full, trigger, config, rng)
            stats.originals_dropped += len(paths) - len(kept)
            paths = kept
        cap = config.max_paths_per_sample
        if cap and len(paths) > cap:
            stats.subsampled_away += len(paths) - cap
            paths = rng.sample(paths, cap)
        own: list[Example] = []
        for path in paths:
            segments = path_to_segments(path, num_layers)
            if segments is None:
                stats.unparseable += 1
                continue
            is_original = path == full
            weight = 1.0
            if config.reweight_original_path_if_shorter_valid and trigger and is_original:
                weight = min(1.0, max(0.0, float(config.original_path_weight)))
                stats.originals_reweighted += 1
            starts, ops = segment_targets(segments, num_layers)
            own.append(Example(q, tuple(starts), tuple(ops), weight, len(path), is_original, not has_original))
            if limit is not None and len(examples) + len(own) >= limit:
                break
        if not own:
            stats.questions_without_paths += 1
            continue
        if config.per_sample_weight_normalize:
            own = [replace(e, weight=e.weight / len(own)) for e in own]
        examples.extend(own)
        if limit is not None and len(examples) >= limit:
            break
    stats.examples = len(examples)
    return examples, stats


def examples_from_files(
    files: Sequence[Sequence[Any]], num_layers: int, config: TrainConfig, limit: int | None
) -> tuple[list[Example], ExampleStats]:
    """The release's concatenation of per-file datasets: each file (difficulty) is read with its
    own ``random.Random(seed)`` and its own ``limit``; question indices count across the files,
    in order, so they point into the concatenated question list."""
    examples: list[Example] = []
    stats = ExampleStats(example_cap=limit)
    offset = 0
    for samples in files:
        own, own_stats = build_examples(samples, num_layers, config, random.Random(config.seed), limit)
        examples.extend(replace(e, question=e.question + offset) for e in own)
        stats.add(own_stats)
        offset += len(samples)
    return examples, stats


# --------------------------------------------------------------------------- loss


@dataclass
class Batch:
    features: torch.Tensor  # [B, T, E]
    mask: torch.Tensor  # [B, T]
    starts: torch.Tensor  # [B, D] float
    ops: torch.Tensor  # [B, D] long, IGNORE_INDEX inside segments
    weights: torch.Tensor  # [B]
    anti: torch.Tensor  # [B] bool
    lengths: torch.Tensor  # [B] float: executed layers of each program

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.features, self.mask, self.starts, self.ops, self.weights,
                                              self.anti, self.lengths)))


def collate(examples: Sequence[Example], features: Sequence[torch.Tensor]) -> Batch:
    padded, mask = pad_features([features[e.question] for e in examples])
    return Batch(
        padded,
        mask,
        torch.tensor([e.starts for e in examples], dtype=torch.float32),
        torch.tensor([e.ops for e in examples], dtype=torch.long),
        torch.tensor([e.weight for e in examples], dtype=torch.float32),
        torch.tensor([e.anti for e in examples], dtype=torch.bool),
        torch.tensor([e.length for e in examples], dtype=torch.float32),
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


def batch_weights(weights: torch.Tensor, lengths: torch.Tensor, lenpref_beta: float | None) -> torch.Tensor:
    """The release's per-batch weights: ``exp(-beta * length)`` normalised to mean 1 (only for
    ``polar_lenpref``, ``lenpref_beta`` not None), times the example weights, normalised to mean 1
    again (each mean plus 1e-8, as the release divides)."""
    w = torch.ones_like(weights)
    if lenpref_beta is not None:
        w = torch.exp(-lenpref_beta * lengths)
        w = w / (w.mean() + 1e-8)
    w = w * weights
    return w / (w.mean() + 1e-8)


def anti_original_penalty(op_logits: torch.Tensor, anti: torch.Tensor) -> torch.Tensor:
    """Mean probability of "keep" over all layers, averaged over the batch's examples whose
    full-depth program is not valid: pushes the predictor away from the failing original."""
    if not bool(anti.any()):
        return op_logits.new_zeros((), dtype=torch.float32)
    keep = torch.softmax(op_logits.float(), dim=-1)[..., KEEP].mean(1)
    return keep[anti].mean()


def batch_loss(
    model: Predictor, batch: Batch, anti_lambda: float, lenpref_beta: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of normalised-weight x example loss (:func:`batch_weights`) plus ``anti_lambda``
    times the anti-original penalty."""
    seg, ops = model(batch.features, batch.mask)
    per_example = example_losses(seg, ops, batch.starts, batch.ops)
    supervised = (batch_weights(batch.weights, batch.lengths, lenpref_beta) * per_example).mean()
    loss = supervised
    parts = {"supervised": float(supervised.detach())}
    if anti_lambda > 0:
        penalty = anti_original_penalty(ops, batch.anti)
        loss = loss + anti_lambda * penalty
        parts["anti_original"] = float(penalty.detach())
    return loss, parts


def _lenpref_beta(config: TrainConfig) -> float | None:
    return config.lenpref_beta if config.policy_mode == "polar_lenpref" else None


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
    """The release's schedule factor after ``step`` scheduler steps.

    ``lr_scheduler none``: 1 (no warmup either: the release builds no scheduler). Otherwise a
    linear warmup ``step / warmup`` (so the very first batch runs at lr 0), with ``warmup`` capped
    at ``total_steps - 1``, then linear or cosine decay to 0 at ``total_steps``.
    """
    if config.lr_scheduler == "none":
        return 1.0
    warm = min(max(0, config.warmup_steps), max(0, total_steps - 1))
    if warm > 0 and step < warm:
        return step / warm
    progress = (step - warm) / max(1, total_steps - warm)
    progress = min(1.0, max(0.0, progress))
    if config.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ReleaseLR:
    """The learning rate as the release's loop sets it, step by step.

    The schedule advances once per batch that reaches the optimizer (under AMP, also when the
    loss scaler skips the update). ``--nan_guard`` skips a batch with a non-finite loss without
    advancing the schedule and, with ``0 < nan_lr_backoff < 1``, multiplies the current lr by it
    (floored at ``min_lr``). With no scheduler the back-off therefore lasts for the rest of
    training; with one, the next scheduler step recomputes ``learning_rate * factor`` and the
    back-off lasts until then — one update.
    """

    def __init__(self, config: TrainConfig, total_steps: int) -> None:
        self.config = config
        self.total_steps = total_steps
        self.scheduled = 0
        self.value = config.learning_rate * lr_factor(0, total_steps, config)

    def after_update(self) -> None:
        if self.config.lr_scheduler != "none":
            self.scheduled += 1
            self.value = self.config.learning_rate * lr_factor(self.scheduled, self.total_steps, self.config)

    def back_off(self) -> None:
        factor = self.config.nan_lr_backoff
        if 0.0 < factor < 1.0:
            self.value = max(max(0.0, self.config.min_lr), self.value * factor)


def _batches(examples: list[Example], batch_size: int, generator: torch.Generator | None) -> list[list[Example]]:
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    ordered = [examples[i] for i in order]
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def evaluate_loss(model: Predictor, data: TrainingSet, config: TrainConfig, device: torch.device) -> float:
    """Validation loss as the release computes it: the training objective of each batch
    (``batch_size`` examples, in order), averaged over batches."""
    model.eval()
    losses = []
    for chunk in _batches(data.examples, config.batch_size, None):
        loss, _ = batch_loss(model, collate(chunk, data.features).to(device), config.anti_original_lambda,
                             _lenpref_beta(config))
        losses.append(float(loss))
    return sum(losses) / len(losses) if losses else float("nan")


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


def _amp(config: TrainConfig, device: torch.device) -> tuple[contextlib.AbstractContextManager, Any]:
    """``--use_amp`` on CUDA: autocast in ``amp_dtype`` (fp16, as the release, with a gradient
    scaler; bf16 needs none). Elsewhere no autocast and no scaler."""
    if not config.use_amp or device.type != "cuda":
        return contextlib.nullcontext(), None
    dtype = AMP_DTYPES[config.amp_dtype]
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


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
    """Train a fresh predictor and write the best checkpoint to ``checkpoint_path``.

    The checkpoint is rewritten whenever validation improves (with ``complete: false`` in its
    JSON, so an interrupted run is never mistaken for a finished one) and once more at the end.
    """
    if not train.examples:
        raise PolarError("no training examples: every question lacked a parseable valid path")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.use_amp and device.type != "cuda":
        log("note: --use_amp has no effect without a CUDA device; training in float32")
    torch.manual_seed(config.seed)
    model = build_predictor(predictor_config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, eps=config.optimizer_eps, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(train.examples) / config.batch_size)
    lr = ReleaseLR(config, steps_per_epoch * config.num_epochs)
    autocast, scaler = _amp(config, device)
    beta = _lenpref_beta(config)
    use_val = val is not None and bool(val.examples) and not config.no_validation
    logger = _Logger(config, asdict(config))
    meta = dict(meta or {})
    meta["training"] = asdict(config)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    step, skipped = 0, 0
    try:
        for epoch in range(1, config.num_epochs + 1):
            model.train()
            started = time.perf_counter()
            total = 0.0
            batches = _batches(train.examples, config.batch_size, generator)
            bar = _progress(batches, epoch, config)
            for chunk in bar:
                for group in optimizer.param_groups:
                    group["lr"] = lr.value
                batch = collate(chunk, train.features).to(device)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss, parts = batch_loss(model, batch, config.anti_original_lambda, beta)
                if not torch.isfinite(loss):
                    skipped += _skip_non_finite(config, step, lr)
                    step += 1
                    continue
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if config.grad_clip_norm > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                    scaler.step(optimizer)  # skipped by the scaler itself on inf/NaN gradients
                    scaler.update()
                else:
                    loss.backward()
                    if config.grad_clip_norm > 0:
                        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                        if not torch.isfinite(norm):  # never apply NaN gradients to the weights
                            optimizer.zero_grad(set_to_none=True)
                            skipped += _skip_non_finite(config, step, lr)
                            step += 1
                            continue
                    optimizer.step()
                used_lr = lr.value
                lr.after_update()
                loss_value = float(loss.detach())
                total += loss_value
                step += 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{used_lr:.2e}")
                logger.log({"train/loss": loss_value, "train/lr": used_lr,
                            **{f"train/{k}": v for k, v in parts.items()}}, step)
            train_loss = total / max(1, len(batches))  # the release's epoch average
            val_loss = evaluate_loss(model, val, config, device) if use_val else None
            record = {"epoch": epoch, "train_loss": train_loss, "seconds": time.perf_counter() - started}
            if val_loss is not None:
                record["val_loss"] = val_loss
            history.append(record)
            logger.log({k: v for k, v in record.items() if k != "epoch"}, step)
            if use_val:
                improved = math.isfinite(val_loss) and (best is None or val_loss < best[0])
            else:
                improved = True  # without validation the last epoch wins
            if improved:
                state = _cpu_state(model)
                best = (val_loss if use_val else float(epoch), epoch, state)
                _save(checkpoint_path, model, state, encoder, {**meta, "complete": False}, history)
            val_text = f" val_loss {val_loss:.4f}" if val_loss is not None else ""
            log(f"epoch {epoch}/{config.num_epochs}: train_loss {train_loss:.4f}{val_text}"
                f"{' (best, saved)' if improved else ''}")
    finally:
        logger.close()
    if best is None:  # validation never gave a finite loss: keep the final weights, as the release does
        best = (float("nan"), config.num_epochs, _cpu_state(model))
    _save(checkpoint_path, model, best[2], encoder, {**meta, "complete": True}, history)
    best_val = best[0] if use_val and math.isfinite(best[0]) else None
    return TrainResult(Path(checkpoint_path), best[1], best_val, history, skipped)


def _skip_non_finite(config: TrainConfig, step: int, lr: ReleaseLR) -> int:
    """Under ``nan_guard``: skip the batch and back off the lr (returns 1 for the count).
    Without it: stop with a hint (the release would apply the NaN update and train on garbage)."""
    if not config.nan_guard:
        raise PolarError(f"training loss became NaN/inf at step {step}; rerun with --nan_guard "
                         "(and --nan_lr_backoff) or a lower --learning_rate")
    lr.back_off()
    return 1


def _cpu_state(model: Predictor) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights, untouched by later training steps."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save(path, model, state, encoder, meta, history) -> None:
    live = _cpu_state(model)
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
