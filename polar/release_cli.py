"""``run_polar.py``: the release's command line (same flags, same defaults), and the driver
behind ``polar train`` / ``polar eval``.

The flow per run: read the supervision files of the chosen difficulties, split them (train
[0:1250], validation [1250:1500], test [1500:1500+num_samples]), train a predictor unless a
finished checkpoint trained with the same training identity already exists at the expected path
(reused, and we say so; an unfinished one left by an interrupted run is trained again; a finished
one trained under other settings is an error, never overwritten), then evaluate it on the test
questions and write ``eval_*.json`` plus plots. Everything here is glue: the work happens in
:mod:`polar.train`, :mod:`polar.decode` and :mod:`polar.evaluate`.

The expected checkpoint name ends in a hash of everything that changes the trained weights
(:meth:`Job.training_identity`: training flags, predictor sizes and architecture, encoder and
feature precision, splits, a digest of the training data), so a rerun with another learning rate
trains a new predictor instead of reusing the old one; eval-only flags (beam size, top-k, cache
trust, ...) are not part of it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, fields, replace
from functools import cached_property
from pathlib import Path

from polar.errors import CheckpointError, DataError
from polar.flags import (
    Parser,
    finite_float,
    int_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed,
    torch_device,
)
from polar.io import check_writable_dir

DIFFICULTIES = (1, 2, 3, 4, 5)
DEFAULT_MODEL = "meta-llama/Llama-3.2-3B-Instruct"
DEFAULT_ENCODER = "Qwen/Qwen3-Embedding-0.6B"


# --------------------------------------------------------------------------- flags


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of SPEC-FLAGS.md (release names and defaults) plus our extras."""
    add = parser.add_argument
    add("--model_path", default=DEFAULT_MODEL, help="base LLM: hub id, local directory or .gguf file")
    add("--data_root", default=os.environ.get("DART_MATH_RESULTS_ROOT", "./data"),
        help="root of {model_path}/dart-math-diff-N/merged_mcts_samples.json")
    add("--save_dir", default=os.environ.get("OUTPUT_DIR", "outputs"), help="checkpoints and eval JSON")
    add("--hf_cache_dir", default=os.environ.get("HF_HOME"), help="Hugging Face model cache")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--target_diff", type=int, choices=DIFFICULTIES, help="one difficulty level (1-5)")
    which.add_argument("--eval_all_diffs", action="store_true", help="all five difficulty levels")
    add("--eval", action="store_true", help="skip training, evaluate only")
    add("--checkpoint_path", default=None, help="explicit checkpoint for evaluation")
    add("--policy_mode", choices=("polar", "polar_lenpref"), default="polar")
    add("--num_epochs", type=positive_int, default=20)
    add("--batch_size", type=positive_int, default=16)
    add("--learning_rate", type=positive_float, default=1e-4)
    add("--seed", type=seed, default=42)
    add("--no_validation", action="store_true", help="train on [0:1500], no validation split")
    add("--max_paths_per_sample", type=positive_int, default=50, help="valid paths kept per question (random subset)")
    add("--max_total_examples", type=positive_int, default=None)
    add("--max_val_examples", type=positive_int, default=20000)
    add("--polar_d_model", type=positive_int, default=256)
    add("--polar_heads", type=positive_int, default=4)
    add("--polar_layers", type=non_negative_int, default=2)
    add("--lenpref_beta", type=finite_float, default=0.05)
    add("--drop_original_path_if_shorter_valid", action="store_true")
    add("--keep_original_prob", type=finite_float, default=0.0, help="clamped to [0, 1] (as the release)")
    add("--reweight_original_path_if_shorter_valid", action="store_true")
    add("--original_path_weight", type=finite_float, default=1.0, help="clamped to [0, 1] (as the release)")
    add("--anti_original_lambda", type=finite_float, default=0.0, help="<= 0: off")
    add("--per_sample_weight_normalize", action="store_true")
    add("--max_new_tokens", type=non_negative_int, default=50, help="0 means 50 (as the release)")
    add("--num_samples", type=non_negative_int, default=500,
        help="test questions per difficulty (0: all 500 of the release's test range)")
    add("--split_sizes", default="1250,250", metavar="TRAIN,VAL",
        help="train and validation questions per difficulty (release: 1250,250; test follows them)")
    add("--eval_dataset", default=None, metavar="NAME",
        help="evaluate on a question set of polar.datasets (e.g. asdiv, mawps: out of distribution) "
             "instead of the test split; every program runs live")
    add("--eval_limit", type=positive_int, default=None, help="questions of --eval_dataset to use")
    add("--trust_valid_cache", dest="trust_valid_cache", action="store_true", default=True)
    add("--no_trust_valid_cache", dest="trust_valid_cache", action="store_false")
    add("--seg_threshold", type=probability, default=0.5, help="segment-start probability threshold")
    add("--beam_size", type=positive_int, default=5)
    add("--top_k_ops", type=positive_int, default=2, help="ops tried per segment (3 or more: all three)")
    add("--top_k_paths", type=positive_int, default=5)
    add("--len_penalty", type=finite_float, default=0.0, help="<= 0: off")
    add("--eval_cache_breakdown", action="store_true", help="only changes the output name (as in the release)")
    add("--use_wandb", action="store_true")
    add("--wandb_project", default="mcts_reward_predictor")
    add("--wandb_run_name", default=None)
    add("--wandb_entity", default=None)
    add("--wandb_dir", default=None)
    add("--delete_checkpoint_after_eval", action="store_true")
    add("--run_tag", default=None, help="added to output names")
    add("--lr_scheduler", choices=("none", "linear", "cosine"), default="none")
    add("--warmup_steps", type=int_range(), default=0, help="negative counts as 0 (as the release)")
    add("--nan_guard", action="store_true")
    add("--nan_lr_backoff", type=probability, default=0.0, help="factor in [0, 1] applied to the lr on a NaN loss; 0: off")
    add("--min_lr", type=finite_float, default=0.0, help="negative counts as 0 (as the release)")
    add("--grad_clip_norm", type=finite_float, default=0.0, help="<= 0: off")
    add("--use_amp", action="store_true", help="mixed precision on CUDA (fp16 with a gradient scaler, as the release)")
    add("--optimizer_eps", type=non_negative_float, default=1e-8)
    add("--weight_decay", type=non_negative_float, default=0.0)
    extras = parser.add_argument_group("polar extras")
    extras.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help="question encoder: hub id or local dir, 'self' (the base LLM's states), "
                             "'minilm' (bundled all-MiniLM-L6-v2) or 'hash' (toy, for tests)")
    extras.add_argument("--encoder_layer", type=non_negative_int, default=None,
                        help="for --encoder self: layers run before taking states (default D/2)")
    extras.add_argument("--feature_precision", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype the encoder runs in and its features are cached in (float32 = the release)")
    extras.add_argument("--predictor_arch", choices=("release", "prenorm"), default="release",
                        help="release: the authors' network; prenorm: our earlier pre-norm variant")
    extras.add_argument("--amp_dtype", choices=("fp16", "bf16"), default="fp16",
                        help="autocast dtype of --use_amp (fp16 uses a gradient scaler, bf16 needs none)")
    extras.add_argument("--feature_cache_dir", default=None, help="default: {save_dir}/cache/features")
    extras.add_argument("--prompt_style", default=None,
                        help="plain, chat, chat_nothink (default: the checkpoint's, else per model)")
    extras.add_argument("--answer_mode", choices=("boxed", "lenient"), default="boxed")
    extras.add_argument("--fewshot", type=non_negative_int, default=0)
    extras.add_argument("--device", type=torch_device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    extras.add_argument("--dtype", default=None, help="base model dtype (default: bf16 on GPU, fp32 on CPU)")
    extras.add_argument("--shard", default=None, metavar="i/n",
                        help="evaluate question shard i of n (default: RANK/WORLD_SIZE from torchrun, else 0/1); "
                             "the last shard to finish writes the merged report")
    extras.add_argument("--eval_batch_size", type=positive_int, default=64, help="sequences per engine call")
    extras.add_argument("--trust_remote_code", action="store_true",
                        help="allow the base model's and the encoder's own Python code to run (off by default)")
    extras.add_argument("--tensorboard_dir", default=None)
    extras.add_argument("--no_progress", action="store_true", help="no progress bars")


def resolve_release_flags(args: argparse.Namespace) -> argparse.Namespace:
    """Checks that involve two flags, and the release's readings of edge values (in place).

    The release reads ``--max_new_tokens 0`` as 50 and ``--num_samples 0`` as its whole test
    range (500), and clamps negative ``--warmup_steps`` and ``--min_lr`` to 0; so do we, so that
    equivalent commands record equal settings.
    """
    d_model, heads = getattr(args, "polar_d_model", None), getattr(args, "polar_heads", None)
    if d_model is not None and heads and d_model % heads:
        raise ValueError(f"argument --polar_d_model: {d_model} is not divisible by --polar_heads {heads}")
    release_readings = {"max_new_tokens": (0, 50), "num_samples": (0, 500)}
    for name, (edge, meaning) in release_readings.items():
        if getattr(args, name, None) == edge:
            setattr(args, name, meaning)
    for name, floor in (("warmup_steps", 0), ("min_lr", 0.0)):
        if getattr(args, name, None) is not None:
            setattr(args, name, max(floor, getattr(args, name)))
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="run_polar.py",
        description="Train the PoLar predictor on search output and evaluate it (release-compatible flags).",
    )
    add_release_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from polar.cli import run_command

    args = build_parser().parse_args(argv)
    return run_command(run_release, args)


# --------------------------------------------------------------------------- driver


class Job:
    """One invocation's resolved settings, with the base model loaded only when needed."""

    def __init__(self, args: argparse.Namespace, log=print) -> None:
        self.args = resolve_release_flags(args)
        self.log = log
        self.diffs = list(DIFFICULTIES) if args.eval_all_diffs else [args.target_diff]
        self.supervision_metadata: dict[Path, dict] = {}  # filled as the splits are read

    # ---- names

    @property
    def model_dir(self) -> str:
        from polar.data import model_dir_name

        return model_dir_name(self.args.model_path)

    def output_stem(self) -> str:
        """Readable part of output names: policy, difficulties, seed, run tag."""
        a = self.args
        diff = "all" if a.eval_all_diffs else str(a.target_diff)
        tag = f"_{a.run_tag}" if a.run_tag else ""
        return f"polar_{a.policy_mode}_diff{diff}_seed{a.seed}{tag}"

    def checkpoint_path(self) -> Path:
        """``--checkpoint_path``, else the name these flags train into (readable part + identity hash)."""
        if self.args.checkpoint_path:
            return Path(self.args.checkpoint_path)
        try:
            digest = self.identity_hash
        except DataError as err:
            if not self.args.eval:
                raise
            raise DataError(f"{err} (the checkpoint name covers the training data; to evaluate without "
                            "it, pass --checkpoint_path)") from None
        return self.checkpoint_dir / f"{self.output_stem()}_{digest}.safetensors"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.args.save_dir) / "checkpoints" / self.model_dir

    def eval_path(self, checkpoint: Path, evaluation: dict) -> Path:
        """``eval_{checkpoint name}_{evaluation hash}.json``: one report per checkpoint and per set
        of evaluation settings (:meth:`evaluation_identity`), so a sweep over decoding or
        generation flags never overwrites another setting's report (the release's name covers
        only some of them: beam size, top-k ops and a positive length penalty). An explicit
        ``--checkpoint_path`` also names the difficulties it is evaluated on, since its own name
        need not say."""
        from polar.identity import identity_hash
        from polar.predictor import checkpoint_files

        a = self.args
        stem = checkpoint_files(checkpoint)[0].stem
        if a.checkpoint_path and not a.eval_dataset:
            stem += f"_diff{'all' if a.eval_all_diffs else a.target_diff}"
        stem += f"_eval{identity_hash(evaluation)[:8]}"
        suffix = "_cache_breakdown" if a.eval_cache_breakdown else ""
        if a.eval_dataset:
            suffix += f"_{a.eval_dataset}"
        return Path(a.save_dir) / "eval" / self.model_dir / f"eval_{stem}{suffix}.json"

    def evaluation_identity(self, scorer_settings: dict, decode: dict) -> dict:
        """Every setting besides the checkpoint that changes an evaluation report: which test
        questions, how programs are decoded, how they are run and judged, and whether the
        release's pass@k trusts cached labels. Batch sizes and progress output do not count."""
        a = self.args
        return {
            "scorer": scorer_settings,
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "decode": decode,
            "questions": {"difficulties": None if a.eval_dataset else self.diffs, "num_samples": a.num_samples,
                          "split_sizes": a.split_sizes, "no_validation": a.no_validation,
                          "eval_dataset": a.eval_dataset, "eval_limit": a.eval_limit},
            "trust_valid_cache": a.trust_valid_cache,
        }

    # ---- identity of a training run

    @cached_property
    def train_config(self):
        return train_config_from_args(self.args)

    def encoder_spec(self):
        from polar.encoders import EncoderSpec

        return EncoderSpec(name=self.args.encoder, layer=self.args.encoder_layer, precision=self.args.feature_precision)

    def encoder_identity(self) -> dict:
        """The encoder spec, plus, for ``self``, the dtype the base model runs in: its token
        states are the features, so ``--dtype bfloat16`` and ``float32`` train different weights."""
        identity = self.encoder_spec().to_dict()
        if self.args.encoder == "self":
            from polar.loading import resolve_device, resolve_dtype

            dtype = resolve_dtype(getattr(self.args, "dtype", None), resolve_device(self.device))
            identity["model_dtype"] = str(dtype).removeprefix("torch.")
        return identity

    def training_identity(self, with_data: bool = True) -> dict:
        """Everything that changes the trained weights; its hash ends the checkpoint name.

        ``data`` digests the questions and valid programs of the train and validation splits, so
        an edited or regenerated supervision file trains anew while its test part, metadata and
        search statistics do not matter.
        """
        train_size, val_size = parse_split_sizes(self.args.split_sizes)
        identity = {
            "model": self.model_dir,
            "difficulties": self.diffs,
            "split_sizes": [train_size, val_size],
            "encoder": self.encoder_identity(),
            "training": self.train_config.weight_identity(),
        }
        if with_data:
            identity["data"] = self.data_digest
        return identity

    @cached_property
    def data_digest(self) -> str:
        """Digest of the train and validation splits (computed once: the splits are cached and
        nothing edits their samples)."""
        from polar.identity import samples_digest

        return samples_digest(split for diff in self.diffs for split in self.splits[diff][:2])

    @cached_property
    def identity_hash(self) -> str:
        from polar.identity import identity_hash

        return identity_hash(self.training_identity())

    @property
    def feature_cache(self) -> Path:
        return Path(self.args.feature_cache_dir or Path(self.args.save_dir) / "cache" / "features")

    # ---- data and model

    @cached_property
    def splits(self) -> dict[int, tuple[list, list, list]]:
        from polar.data import load_samples_with_metadata, split_samples, supervision_path

        out = {}
        for diff in self.diffs:
            path = supervision_path(self.args.data_root, self.args.model_path, diff)
            samples, self.supervision_metadata[path] = load_samples_with_metadata(path)
            train_size, val_size = parse_split_sizes(self.args.split_sizes)
            out[diff] = split_samples(samples, num_samples=self.args.num_samples, no_validation=self.args.no_validation,
                                      train_size=train_size, val_size=val_size)
            train, val, test = out[diff]
            self.log(f"difficulty {diff}: {len(samples)} samples in {path} -> "
                     f"train {len(train)}, validation {len(val)}, test {len(test)}")
        return out

    @cached_property
    def device(self) -> str | None:
        """The flag, else (under torchrun) the GPU named by LOCAL_RANK."""
        from polar.distributed import default_device

        return default_device(self.args.device)

    @cached_property
    def runner(self):
        from polar.engine import ProgramRunner

        self.log(f"loading {self.args.model_path} ...")
        return ProgramRunner.from_pretrained(
            self.args.model_path, device=self.device, dtype=self.args.dtype, cache_dir=self.args.hf_cache_dir,
            trust_remote_code=self.trust_remote_code,
        )

    @property
    def trust_remote_code(self) -> bool:
        return bool(getattr(self.args, "trust_remote_code", False))

    @cached_property
    def model_config(self):
        """The base model's config when readable without loading weights or the network."""
        if "runner" in self.__dict__:
            return self.runner.model.config
        from polar.model_files import check_model_folder, local_model_path

        local = local_model_path(str(self.args.model_path), "model")
        if local is not None:  # refuse custom code, pickle, damaged files before reading anything
            check_model_folder(local, "model", self.trust_remote_code)
        if not str(self.args.model_path).endswith(".gguf"):
            try:
                from transformers import AutoConfig

                return AutoConfig.from_pretrained(
                    self.args.model_path, cache_dir=self.args.hf_cache_dir, local_files_only=True,
                    trust_remote_code=self.trust_remote_code,
                )
            except Exception:  # not cached locally: the runner will load (or explain) it
                pass
        return self.runner.model.config

    @property
    def num_layers(self) -> int:
        """Depth D; training needs only this, so read it from the config when possible."""
        config = getattr(self.model_config, "text_config", None) or self.model_config
        return int(config.num_hidden_layers)

    def prompt_style(self, checkpoint_meta: dict | None = None) -> str:
        """The flag, else the style the inputs recorded (checkpoint for evaluation, supervision
        files for training), else the model's default: search and evaluation agree by default."""
        from polar.prompts import choose_prompt_style, recorded_prompt_style

        if checkpoint_meta is not None:
            recorded = [("checkpoint", recorded_prompt_style(checkpoint_meta))]
        else:
            recorded = [(str(path), recorded_prompt_style(meta)) for path, meta in self.supervision_metadata.items()]
        return choose_prompt_style(self.args.prompt_style, recorded, self.args.model_path)

    def encode(self, encoder_spec, texts: list[str]):
        from polar.encoders import build_encoder, encode_cached

        runner = self.runner if encoder_spec.name == "self" else None
        encoder = build_encoder(encoder_spec, runner=runner, device=self.device, cache_dir=self.args.hf_cache_dir,
                                trust_remote_code=self.trust_remote_code)
        return encoder, encode_cached(encoder, texts, self.feature_cache)


def train_config_from_args(args: argparse.Namespace):
    """TrainConfig fields have the flags' names; copy the ones present."""
    from polar.train import TrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["progress"] = not getattr(args, "no_progress", False)
    return TrainConfig(**values)


def decode_config_from_args(args: argparse.Namespace):
    from polar.decode import DecodeConfig

    return DecodeConfig(args.seg_threshold, args.beam_size, args.top_k_ops, args.top_k_paths, args.len_penalty)


def train_job(job: Job) -> Path:
    """Train unless a finished checkpoint of the same training identity exists; return its path."""
    from polar.distributed import parse_shard
    from polar.io import run_metadata
    from polar.train import TrainingSet, check_logging_available, examples_from_files, train_predictor

    args, log = job.args, job.log
    path = job.checkpoint_path()
    identity = job.training_identity()
    if reusable_checkpoint(path, identity, explicit=bool(args.checkpoint_path), log=log):
        return path
    if parse_shard(getattr(args, "shard", None))[1] > 1:
        raise CheckpointError(
            f"no checkpoint at {path}: train in one process first, then evaluate in shards with --eval "
            "(several ranks training the same checkpoint would overwrite each other)"
        )
    _note_unhashed_checkpoint(job)
    config = job.train_config
    check_logging_available(config)
    train_files = [job.splits[diff][0] for diff in job.diffs]
    val_files = [] if args.no_validation else [job.splits[diff][1] for diff in job.diffs]
    train_samples = [s for split in train_files for s in split]
    val_samples = [s for split in val_files for s in split]
    if not train_samples:
        raise DataError("no training questions in the supervision files of the chosen difficulties")
    num_layers = job.num_layers
    train_examples, train_stats = examples_from_files(train_files, num_layers, config, config.max_total_examples)
    val_examples, val_stats = examples_from_files(val_files, num_layers, config, config.max_val_examples)
    log(f"train: {train_stats.summary()}")
    if val_samples:
        log(f"validation: {val_stats.summary()}")
    spec = job.encoder_spec()
    encoder, train_features = job.encode(spec, [s.question for s in train_samples])
    _, val_features = job.encode(spec, [s.question for s in val_samples]) if val_samples else (None, [])
    if spec.name == "self":
        spec = replace(spec, layer=encoder.layer)
    prompt_style = job.prompt_style()
    meta = {
        "model_path": args.model_path,
        "prompt_style": prompt_style,
        "answer_mode": args.answer_mode,
        "fewshot": args.fewshot,
        "max_new_tokens": args.max_new_tokens,
        "difficulties": job.diffs,
        "identity": identity,
        "identity_hash": job.identity_hash,
        "flags": {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (str, int, float, bool, type(None)))},
        "example_stats": {"train": asdict(train_stats), "validation": asdict(val_stats)},
        **run_metadata(model=args.model_path, encoder=spec.to_dict(), prompt_style=prompt_style, seed=args.seed),
    }
    result = train_predictor(
        TrainingSet(train_features, train_examples, train_stats),
        TrainingSet(val_features, val_examples, val_stats) if val_examples else None,
        config.predictor_config(num_layers, encoder.dim), config, path, spec, meta, log=log,
    )
    best = f" (best epoch {result.best_epoch}, val_loss {result.best_val_loss:.4f})" if result.best_val_loss is not None else ""
    log(f"saved predictor checkpoint {path}{best}")
    return path


def checkpoint_identity(meta: dict) -> tuple[dict, bool]:
    """The training identity a checkpoint's JSON records, and whether it is only partial.

    Checkpoints written before the identity was stored record their training flags (compared
    as far as they go), their encoder name and, by its absence, the pre-norm architecture.
    """
    from polar.predictor import LEGACY_ARCH
    from polar.train import TrainConfig

    if isinstance(meta.get("identity"), dict):
        return meta["identity"], False
    partial: dict = {}
    recorded = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    names = {f.name for f in fields(TrainConfig)}
    known = {k: v for k, v in recorded.items() if k in names}
    architecture = meta.get("predictor") if isinstance(meta.get("predictor"), dict) else {}
    known.setdefault("predictor_arch", architecture.get("arch", LEGACY_ARCH))
    try:
        partial["training"] = {k: v for k, v in TrainConfig(**known).weight_identity().items() if k in known}
    except (TypeError, ValueError):
        pass
    encoder = meta.get("encoder")
    if isinstance(encoder, dict) and "name" in encoder:
        partial["encoder"] = {"name": encoder["name"]}
    return partial, True


def reusable_checkpoint(path: Path, identity: dict, explicit: bool, log) -> bool:
    """True when a finished checkpoint trained with this identity is at ``path`` (and say so).

    An unfinished one (interrupted training) is retrained. A finished one trained under other
    settings is never overwritten: that is an error naming the differences.
    """
    from polar.identity import identity_differences
    from polar.predictor import checkpoint_files, load_checkpoint_info

    weights, manifest = checkpoint_files(path)
    if not (weights.exists() and manifest.exists()):
        return False
    try:
        meta = load_checkpoint_info(path)  # undecodable JSON: CheckpointError already
    except OSError as err:  # unreadable file: the same one-line error
        raise CheckpointError(f"{manifest}: not a predictor checkpoint manifest ({err})") from None
    if meta.get("complete") is False:
        log(f"checkpoint {path} is unfinished (its training was interrupted): training again")
        return False
    stored, partial = checkpoint_identity(meta)
    differences = identity_differences(stored, identity, only_common=partial)
    if differences:
        advice = ("pass another --checkpoint_path to train these flags" if explicit
                  else "delete it or pass a different --run_tag")
        raise CheckpointError(
            f"{path} exists but was trained with other settings ({'; '.join(differences[:4])}"
            f"{'; ...' if len(differences) > 4 else ''}); evaluate it with --eval, or {advice}"
        )
    checked = " (it records only its training flags; encoder and data were not checked)" if partial else ""
    log(f"checkpoint {path} was trained with these same settings: skipping training{checked} "
        "(delete it or pass a different --run_tag to retrain)")
    return True


def _note_unhashed_checkpoint(job: Job) -> None:
    """Point at a checkpoint of the same run named the old way (no settings hash): it is not
    reused, since the settings it was trained with cannot all be verified."""
    if job.args.checkpoint_path:
        return
    old = job.checkpoint_dir / f"{job.output_stem()}.safetensors"
    if old.exists():
        job.log(f"note: {old} (named without a settings hash, from an older version) is not reused; "
                f"evaluate it with --eval --checkpoint_path {old}")


def warn_if_trained_differently(job: Job, path: Path, meta: dict, arch: str) -> None:
    """``--eval`` of a checkpoint trained under other settings than these flags: say which
    (evaluating a foreign checkpoint is legitimate, so this is not an error)."""
    from polar.identity import identity_differences

    try:
        identity = job.training_identity()
    except (DataError, FileNotFoundError):  # e.g. --eval_dataset without supervision files here
        identity = job.training_identity(with_data=False)
    stored, partial = checkpoint_identity({**meta, "predictor": {"arch": arch}})
    if "data" not in identity:
        stored = {k: v for k, v in stored.items() if k != "data"}
    differences = identity_differences(stored, identity, only_common=partial)
    if differences:
        job.log(f"warning: checkpoint {path} was trained with other settings than these flags "
                "(evaluating it anyway):")
        for line in differences:
            job.log(f"  {line}")


def parse_split_sizes(text: str) -> tuple[int, int]:
    """``"1250,250"`` -> (1250, 250)."""
    try:
        train, val = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--split_sizes must look like 1250,250 (train,validation), got {text!r}") from None
    if train < 0 or val < 0:
        raise ValueError(f"--split_sizes {text}: sizes must not be negative")
    return train, val


def ood_samples(name: str, limit: int | None):
    """Questions of another set as samples with no cached programs (everything runs live)."""
    from polar.data import Sample
    from polar.datasets import load_questions

    return [Sample(index=i, id=q.id, question=q.question, answer=q.answer, valid_paths=[])
            for i, q in enumerate(load_questions(name, limit=limit))]


def eval_job(job: Job, checkpoint: Path | None = None) -> Path:
    """Evaluate a checkpoint on the test split(s); write the report; return its path."""
    from polar.distributed import parse_shard
    from polar.evaluate import EvalConfig, format_metrics, run_evaluation, write_report
    from polar.predictor import checkpoint_files, load_checkpoint, refuse_pickle_checkpoint
    from polar.scoring import ProgramScorer

    args, log = job.args, job.log
    path = Path(checkpoint or job.checkpoint_path())
    refuse_pickle_checkpoint(path)
    if not all(p.exists() for p in checkpoint_files(path)):
        raise CheckpointError(f"no predictor checkpoint at {path}{_other_runs_hint(job)}: "
                              "train first (drop --eval) or pass --checkpoint_path")
    runner = job.runner
    ckpt = load_checkpoint(path, num_layers=runner.num_layers, device=job.device or "cpu")
    warn_if_trained_differently(job, path, ckpt.meta, ckpt.model.config.arch)
    samples, diffs = [], []
    if args.eval_dataset:
        samples = ood_samples(args.eval_dataset, args.eval_limit)
        diffs = [args.eval_dataset] * len(samples)
    for diff in [] if args.eval_dataset else job.diffs:
        test = job.splits[diff][2]
        samples.extend(test)
        diffs.extend([diff] * len(test))
    if not samples:
        raise DataError("no test questions: the test split is samples [1500:1500+num_samples] of each file")
    shard, num_shards = parse_shard(getattr(args, "shard", None))
    if num_shards > 1:
        samples, diffs = samples[shard::num_shards], diffs[shard::num_shards]
        log(f"shard {shard}/{num_shards}: {len(samples)} test questions")
    _, features = job.encode(ckpt.encoder, [s.question for s in samples])
    prompt_style = job.prompt_style(ckpt.meta)
    scorer = ProgramScorer(runner, prompt_style=prompt_style, answer_mode=args.answer_mode,
                           max_new_tokens=args.max_new_tokens, fewshot=args.fewshot, batch_size=args.eval_batch_size)
    decode = decode_config_from_args(args)
    report = run_evaluation(ckpt.model, samples, features, diffs, scorer, runner.num_layers,
                            EvalConfig(decode, args.trust_valid_cache))
    settings = {
        **scorer.settings(),
        "model": args.model_path,
        "checkpoint": str(path),
        "encoder": ckpt.encoder.to_dict(),
        "seed": args.seed,
        "difficulties": job.diffs,
        "num_samples": args.num_samples,
        "split_sizes": args.split_sizes,
        "eval_dataset": args.eval_dataset,
        "trust_valid_cache": args.trust_valid_cache,
        "decode": asdict(decode),
        "training": ckpt.meta.get("training"),
        "checkpoint_identity_hash": ckpt.meta.get("identity_hash"),
        "checkpoint_prompt_style": ckpt.meta.get("prompt_style"),
    }
    report_path = job.eval_path(path, job.evaluation_identity(scorer.settings(), asdict(decode)))
    if num_shards > 1:
        report = _merge_if_complete(report_path, report, shard, num_shards, runner.num_layers)
        if report is None:
            log(f"shard {shard}/{num_shards} done; the last shard to finish writes {report_path}")
            return report_path
    out = write_report(report, report_path, runner.num_layers, settings, log=log)
    log(format_metrics(report["metrics"]))
    log(f"wrote {out}")
    if args.delete_checkpoint_after_eval:
        for file in checkpoint_files(path):
            file.unlink(missing_ok=True)
        log(f"deleted checkpoint {path}")
    return out


def _other_runs_hint(job: Job) -> str:
    """When --eval finds no checkpoint for these flags, name the ones of the same run trained
    under other settings (a changed flag is the usual reason)."""
    if job.args.checkpoint_path:
        return ""
    others = sorted(job.checkpoint_dir.glob(f"{job.output_stem()}_*.safetensors"))
    if not others:
        return ""
    names = ", ".join(o.name for o in others[:3]) + (", ..." if len(others) > 3 else "")
    return f" (checkpoints of this run trained with other flags: {names}; pass one as --checkpoint_path)"


def _merge_if_complete(eval_path: Path, report: dict, shard: int, num_shards: int, num_layers: int) -> dict | None:
    """Save this shard's report; when every shard's is there, return the merged report."""
    import json

    from polar.evaluate import merge_reports
    from polar.io import write_json_atomic

    folder = eval_path.with_name(eval_path.stem + ".shards")
    write_json_atomic(folder / f"shard-{shard:05d}-of-{num_shards:05d}.json", report)
    files = [folder / f"shard-{i:05d}-of-{num_shards:05d}.json" for i in range(num_shards)]
    if not all(f.exists() for f in files):
        return None
    return merge_reports([json.loads(f.read_text(encoding="utf-8")) for f in files], num_layers)


def run_release(args: argparse.Namespace) -> int:
    """``run_polar.py``: train (unless --eval) and evaluate."""
    job = _start_job(args)
    checkpoint = None if args.eval else train_job(job)
    eval_job(job, checkpoint)
    return 0


def train_command(args: argparse.Namespace) -> int:
    """``polar train``: training only."""
    train_job(_start_job(args))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """``polar eval``: evaluation only."""
    eval_job(_start_job(args))
    return 0


def _start_job(args: argparse.Namespace) -> Job:
    """The job of a command; its output folder is checked first (results are written last)."""
    job = Job(args, log=_log)
    check_writable_dir(job.args.save_dir, "--save_dir")
    return job


def _log(message: str) -> None:
    print(message, flush=True)
    sys.stdout.flush()
