"""Does the precision of the encoder features change the programs the predictor decodes?

The release computes its encoder's token states in float32. polar's default does too; bfloat16 /
float16 (``--feature_precision``) halve the feature cache. This measures, on real supervision
files, how many decoded programs change:

* **stored precision**: one predictor (trained on float32 features) decodes every question from
  float32 features and from the same features rounded to float16 / bfloat16 (what a half-precision
  cache holds), and from features computed in bfloat16 by the encoder itself;
* **trained on half precision**: a second predictor, same seed and flags, trained and evaluated on
  bfloat16 features, against the float32 one.

Questions: every sample of every ``merged_mcts_samples.json`` under ``--data`` (a folder or a
``.tar.gz``, default the SmolLM2 files shipped in ``supervision/``). Decoding uses the release's
defaults (threshold 0.5, beam 5, 2 ops per segment, top 5 programs).

Run: ``python bench/feature_precision.py [--encoder minilm|self] [--epochs N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar.data import load_samples  # noqa: E402
from polar.decode import DecodeConfig, predict_candidates  # noqa: E402
from polar.encoders import EncoderSpec, build_encoder, round_features  # noqa: E402
from polar.predictor import load_checkpoint, pad_features  # noqa: E402
from polar.train import TrainConfig, TrainingSet, examples_from_files, train_predictor  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "supervision" / "smollm2-135m-instruct.tar.gz"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def supervision_files(data: Path, scratch: Path) -> list[Path]:
    if data.suffixes[-2:] == [".tar", ".gz"]:
        with tarfile.open(data) as archive:
            archive.extractall(scratch, filter="data")
        data = scratch
    return sorted(data.rglob("merged_mcts_samples.json"))


def decoded(model, features, config: DecodeConfig) -> list[list[tuple[int, ...]]]:
    return [[tuple(c.program) for c in cands] for cands in predict_candidates(model, features, config)]


def compare(reference, other) -> dict[str, int]:
    return {
        "questions": len(reference),
        "top1_changed": sum(a[0] != b[0] for a, b in zip(reference, other)),
        "topk_list_changed": sum(a != b for a, b in zip(reference, other)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder or .tar.gz of supervision files")
    parser.add_argument("--encoder", default="minilm", help="minilm (bundled) or self (SmolLM2's layer-15 states)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        files = supervision_files(args.data, Path(scratch))
        splits = [load_samples(f) for f in files]
        num_layers = 1 + max(max(p) for split in splits for s in split for p in s.valid_paths)
        questions = [s.question for split in splits for s in split]

        runner = None
        if args.encoder == "self":
            from polar.engine import ProgramRunner

            runner = ProgramRunner.from_pretrained(SMOLLM2, device="cpu")
        fp32 = build_encoder(EncoderSpec(name=args.encoder), runner=runner, device="cpu")
        features = {"float32": fp32.encode(questions)}
        features["float16 stored"] = round_features(features["float32"], "float16")
        features["bfloat16 stored"] = round_features(features["float32"], "bfloat16")
        if args.encoder != "self":  # the encoder itself running in bfloat16
            bf16 = build_encoder(EncoderSpec(name=args.encoder, precision="bfloat16"), device="cpu")
            features["bfloat16 computed"] = bf16.encode(questions)

        config = TrainConfig(num_epochs=args.epochs, learning_rate=args.learning_rate, seed=args.seed,
                             batch_size=16, no_validation=True, device="cpu", progress=False,
                             max_paths_per_sample=50, per_sample_weight_normalize=True)
        examples, stats = examples_from_files(splits, num_layers, config, None)
        decode = DecodeConfig()
        models = {}
        for name, seed in (("float32", args.seed), ("bfloat16 stored", args.seed), ("float32", args.seed + 1)):
            key = f"{name} seed {seed}"
            train_predictor(TrainingSet(features[name], examples, stats), None,
                            config.predictor_config(num_layers, fp32.dim), replace(config, seed=seed),
                            Path(scratch) / f"ck-{len(models)}", EncoderSpec(name=args.encoder), log=lambda *_: None)
            models[key] = load_checkpoint(Path(scratch) / f"ck-{len(models)}").model
        reference_model = models[f"float32 seed {args.seed}"]
        reference = decoded(reference_model, features["float32"], decode)
        rows = {f"float32 predictor, {name} features": compare(reference, decoded(reference_model, feats, decode))
                for name, feats in features.items() if name != "float32"}
        rows["bfloat16-trained predictor, bfloat16 features"] = compare(
            reference, decoded(models[f"bfloat16 stored seed {args.seed}"], features["bfloat16 stored"], decode))
        rows["float32-trained predictor, seed + 1 (run-to-run scale)"] = compare(
            reference, decoded(models[f"float32 seed {args.seed + 1}"], features["float32"], decode))
        with torch.no_grad():
            batch, mask = pad_features(features["float32"])
            seg32, ops32 = reference_model(batch, mask)
            batch16, _ = pad_features(features["float16 stored"])
            seg16, ops16 = reference_model(batch16, mask)
        max_logit_change = float(max((seg32 - seg16).abs().max(), (ops32 - ops16).abs().max()))

    result = {
        "files": [str(f.relative_to(scratch)) if str(f).startswith(scratch) else str(f) for f in files],
        "encoder": args.encoder, "num_layers": num_layers, "questions": len(questions),
        "examples": stats.examples, "epochs": args.epochs, "learning_rate": args.learning_rate,
        "decode": asdict(decode),
        "rows": rows, "max_logit_change_float16_stored": max_logit_change,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"{len(questions)} questions from {len(files)} files, D={num_layers}, encoder {args.encoder}, "
          f"{stats.examples} training examples")
    for name, row in rows.items():
        print(f"  {name:54s} top-1 changed {row['top1_changed']:3d}/{row['questions']}, "
              f"top-5 list changed {row['topk_list_changed']:3d}/{row['questions']}")
    print(f"  largest logit change from float16-stored features: {max_logit_change:.2e}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
