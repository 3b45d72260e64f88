"""run_polar.py end to end on a tiny random-weight Llama saved with a tokenizer in a tmp dir."""

from __future__ import annotations

import json
import random
import re

import pytest

from polar.release_cli import Job, build_parser, main

from conftest import tiny_model

WORDS = ("solve the following math problem and output only final answer directly formatted strictly as "
         "boxed problem start end what is of plus minus times x y").split()


def save_tiny_llama(directory) -> None:
    """A 6-layer random Llama plus a word-level tokenizer (fits the 97-token vocabulary)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *list("0123456789{}\\#:.?+-=$"), *WORDS])}
    assert len(vocab) <= 97
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")
    model = tiny_model("llama")
    model.generation_config.eos_token_id = 2
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_supervision(root, model_path: str, n: int = 1504, difficulty: int = 1) -> None:
    """Keyword questions: 'plus' questions skip layer 2, others loop layer 4."""
    rng = random.Random(0)
    samples = []
    for i in range(n):
        kind = rng.choice(["plus", "minus"])
        valid = [[0, 1, 3, 4, 5]] if kind == "plus" else [[0, 1, 2, 3, 4, 4, 5], [0, 1, 2, 3, 4, 5]]
        samples.append({
            "question": f"what is {i} {kind} {rng.randrange(9)} {'x' * difficulty}",
            "gt_ans": str(i),
            "initial_score": float(kind == "minus"),
            "final_valid_transitions": valid + ([[5, 4, 3]] if i % 10 == 0 else []),  # unparseable
            "final_invalid_transitions": [[0, 1, 2]],
        })
    from polar.data import supervision_path

    path = supervision_path(root, model_path, difficulty)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"samples": samples}))


def test_flags_and_defaults_match_the_release():
    args = build_parser().parse_args(["--target_diff", "1"])
    assert args.model_path == "meta-llama/Llama-3.2-3B-Instruct"
    assert (args.num_epochs, args.batch_size, args.learning_rate, args.seed) == (20, 16, 1e-4, 42)
    assert (args.max_paths_per_sample, args.max_val_examples, args.num_samples) == (50, 20000, 500)
    assert (args.polar_d_model, args.polar_heads, args.polar_layers, args.lenpref_beta) == (256, 4, 2, 0.05)
    assert (args.beam_size, args.top_k_ops, args.top_k_paths, args.seg_threshold) == (5, 2, 5, 0.5)
    assert args.trust_valid_cache and not build_parser().parse_args(
        ["--target_diff", "1", "--no_trust_valid_cache"]).trust_valid_cache
    assert (args.lr_scheduler, args.optimizer_eps, args.wandb_project) == ("none", 1e-8, "mcts_reward_predictor")
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # one of --target_diff / --eval_all_diffs is required
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--target_diff", "1", "--eval_all_diffs"])


def test_eval_without_checkpoint_is_one_line_error(tmp_path, capsys):
    code = main(["--target_diff", "1", "--eval", "--checkpoint_path", str(tmp_path / "nope.safetensors"),
                 "--model_path", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    model_dir = root / "tiny-llama"
    save_tiny_llama(model_dir)
    data = root / "data"
    write_supervision(data, str(model_dir))
    return root, model_dir, data


def run(tiny_setup, *extra):
    root, model_dir, data = tiny_setup
    return main([
        "--target_diff", "1", "--model_path", str(model_dir), "--data_root", str(data),
        "--save_dir", str(root / "out"), "--encoder", "hash", "--num_epochs", "2", "--batch_size", "128",
        "--learning_rate", "5e-4", "--per_sample_weight_normalize", "--reweight_original_path_if_shorter_valid",
        "--original_path_weight", "0.30", "--lr_scheduler", "cosine", "--warmup_steps", "10",
        "--polar_d_model", "32", "--num_samples", "4", "--top_k_paths", "3", "--max_new_tokens", "4",
        "--device", "cpu", "--no_progress", "--max_total_examples", "512", *extra,
    ])


def test_end_to_end_train_then_eval_then_skip(tiny_setup, capsys):
    root, _, _ = tiny_setup
    assert run(tiny_setup) == 0
    out = capsys.readouterr().out
    assert "train 1250, validation 250, test 4" in out and "no segment parse" in out
    (ckpt,) = list((root / "out" / "checkpoints").rglob("polar_polar_diff1_seed42_*.safetensors"))
    name_hash = re.fullmatch(r"polar_polar_diff1_seed42_([0-9a-f]{10})\.safetensors", ckpt.name).group(1)
    manifest = json.loads(ckpt.with_suffix(".json").read_text())
    assert manifest["num_layers"] == 6 and manifest["encoder"]["name"] == "hash"
    assert manifest["training"]["original_path_weight"] == 0.3 and manifest["prompt_style"] == "plain"
    assert manifest["complete"] is True and manifest["identity_hash"] == name_hash
    assert manifest["identity"]["training"]["learning_rate"] == 5e-4 and manifest["flags"]["beam_size"] == 5
    (report_path,) = (root / "out" / "eval").rglob("eval_*.json")
    assert re.fullmatch(rf"eval_{ckpt.stem}_eval[0-9a-f]{{8}}\.json", report_path.name)
    report = json.loads(report_path.read_text())
    overall = report["metrics"]["overall"]
    for key in ("pass_at_k", "pass_at_1", "vote_at_k", "baseline_accuracy", "mean_layers_top1",
                "layer_ratio_top1", "cache_hit_rate", "seconds_per_question"):
        assert key in overall
    assert overall["num_questions"] == 4 and set(report["metrics"]["per_difficulty"]) == {"1"}
    assert report["settings"]["max_new_tokens"] == 4 and report["settings"]["encoder"]["name"] == "hash"
    assert len(report["per_question"]) == 4 and len(report["per_question"][0]["programs"]) <= 3
    assert list((root / "out" / "eval").rglob("*_layer_heatmap.png"))
    # second run: the checkpoint exists, training is skipped and it says so
    assert run(tiny_setup) == 0
    assert f"{ckpt} was trained with these same settings: skipping training" in capsys.readouterr().out


def test_polar_eval_subcommand_and_depth_mismatch(tiny_setup, tmp_path, capsys):
    from polar.cli import main as polar_main
    from polar.encoders import EncoderSpec
    from polar.predictor import PolarPredictor, PredictorConfig, save_checkpoint

    root, model_dir, data = tiny_setup
    wrong = tmp_path / "deep"
    save_checkpoint(wrong, PolarPredictor(PredictorConfig(num_layers=30, encoder_dim=64, d_model=32)),
                    EncoderSpec("hash"), {})
    code = polar_main(["eval", "--target_diff", "1", "--model_path", str(model_dir), "--data_root", str(data),
                       "--checkpoint_path", str(wrong), "--num_samples", "2", "--device", "cpu"])
    assert code == 2 and "30 layers" in capsys.readouterr().err


def test_self_encoder_uses_the_base_model_states(tiny_setup, capsys):
    """--encoder self needs no second model; the checkpoint records the layer it read."""
    root, _, _ = tiny_setup
    assert run(tiny_setup, "--encoder", "self", "--encoder_layer", "2", "--num_epochs", "1",
               "--max_total_examples", "256", "--max_val_examples", "64", "--run_tag", "self") == 0
    (manifest,) = (root / "out" / "checkpoints").rglob("*_self_*.json")
    encoder = json.loads(manifest.read_text())["encoder"]
    assert encoder["name"] == "self" and encoder["layer"] == 2
    (report,) = (root / "out" / "eval").rglob("eval_*_self_*.json")
    assert json.loads(report.read_text())["metrics"]["overall"]["num_questions"] == 4


def test_sharded_eval_merges_into_one_report(tiny_setup, capsys):
    """Two shards (as torchrun ranks would be) evaluate half the questions each; the last one to
    finish writes the report over all questions."""
    root, _, _ = tiny_setup
    common = ("--run_tag", "sharded", "--num_epochs", "1", "--max_total_examples", "128")
    assert run(tiny_setup, *common, "--shard", "0/2") == 2  # no checkpoint: train unsharded first
    assert "train in one process first" in capsys.readouterr().err
    assert run(tiny_setup, *common) == 0
    (single,) = (root / "out" / "eval").rglob("eval_*_sharded_*.json")
    expected = json.loads(single.read_text())
    single.unlink()
    assert run(tiny_setup, *common, "--eval", "--shard", "1/2") == 0
    assert not single.exists() and "the last shard to finish writes" in capsys.readouterr().out
    assert run(tiny_setup, *common, "--eval", "--shard", "0/2") == 0
    merged = json.loads(single.read_text())
    assert merged["timing"]["shards"] == 2 and merged["metrics"]["overall"]["num_questions"] == 4
    assert sorted(q["id"] for q in merged["per_question"]) == sorted(q["id"] for q in expected["per_question"])
    for key in ("pass_at_k", "pass_at_1", "vote_at_k", "baseline_accuracy", "mean_layers_top1"):
        assert merged["metrics"]["overall"][key] == expected["metrics"]["overall"][key]


@pytest.mark.slow
def test_eval_all_diffs_reports_each_difficulty(tiny_setup):
    root, model_dir, data = tiny_setup
    for diff in (2, 3, 4, 5):
        if not (data / str(model_dir).lstrip("/") / f"dart-math-diff-{diff}").exists():
            write_supervision(data, str(model_dir), n=1502, difficulty=diff)
    args = ["--eval_all_diffs", "--model_path", str(model_dir), "--data_root", str(data),
            "--save_dir", str(root / "out"), "--encoder", "hash", "--num_epochs", "1", "--batch_size", "128",
            "--polar_d_model", "16", "--num_samples", "1", "--top_k_paths", "2", "--max_new_tokens", "2",
            "--max_total_examples", "256", "--max_val_examples", "64", "--device", "cpu", "--no_progress"]
    assert main(args) == 0
    (report,) = (root / "out" / "eval").rglob("eval_polar_polar_diffall_seed42_*.json")
    metrics = json.loads(report.read_text())["metrics"]
    assert set(metrics["per_difficulty"]) == {"1", "2", "3", "4", "5"}
    assert metrics["overall"]["num_questions"] == 5
    assert all(m["num_questions"] == 1 for m in metrics["per_difficulty"].values())


def test_scaled_down_splits_and_out_of_distribution_eval(tiny_setup, capsys):
    root, _, _ = tiny_setup
    tag = ["--run_tag", "small", "--split_sizes", "100,20"]
    assert run(tiny_setup, *tag) == 0
    assert "train 100, validation 20, test 4" in capsys.readouterr().out
    # the same checkpoint on another question set: live only, its own report file
    assert run(tiny_setup, *tag, "--eval", "--eval_dataset", "mawps", "--eval_limit", "3") == 0
    (report_path,) = (root / "out" / "eval").rglob("eval_*_small_*_mawps.json")
    report = json.loads(report_path.read_text())
    assert set(report["metrics"]["per_difficulty"]) == {"mawps"}
    assert report["metrics"]["overall"]["num_questions"] == 3
    assert report["metrics"]["overall"]["cache_hit_rate"] == 0.0
    assert report["settings"]["eval_dataset"] == "mawps"


def test_bad_split_sizes_are_one_line_errors(tiny_setup, capsys):
    assert run(tiny_setup, "--split_sizes", "12") == 2
    assert "--split_sizes must look like 1250,250" in capsys.readouterr().err


# --------------------------------------------------------------------------- checkpoint identity

BASE = ["--target_diff", "1", "--encoder", "hash", "--learning_rate", "5e-4"]
WEIGHT_FLAGS = [
    ["--learning_rate", "1e-3"], ["--num_epochs", "3"], ["--batch_size", "64"], ["--seed", "7"],
    ["--policy_mode", "polar_lenpref"], ["--policy_mode", "polar_lenpref", "--lenpref_beta", "0.1"],
    ["--drop_original_path_if_shorter_valid"], ["--keep_original_prob", "0.5"],
    ["--reweight_original_path_if_shorter_valid"],
    ["--reweight_original_path_if_shorter_valid", "--original_path_weight", "0.3"],
    ["--anti_original_lambda", "0.1"], ["--per_sample_weight_normalize"], ["--max_paths_per_sample", "10"],
    ["--max_total_examples", "100"], ["--max_val_examples", "50"], ["--no_validation"],
    ["--split_sizes", "1000,250"], ["--polar_d_model", "128"], ["--polar_heads", "8"], ["--polar_layers", "3"],
    ["--predictor_arch", "prenorm"], ["--encoder", "minilm"], ["--encoder_layer", "2"],
    ["--feature_precision", "bfloat16"], ["--lr_scheduler", "cosine"],
    ["--lr_scheduler", "cosine", "--warmup_steps", "10"], ["--nan_guard"],
    ["--nan_guard", "--nan_lr_backoff", "0.5"], ["--nan_guard", "--min_lr", "1e-6"], ["--grad_clip_norm", "1.0"],
    ["--use_amp"], ["--use_amp", "--amp_dtype", "bf16"], ["--optimizer_eps", "1e-6"], ["--weight_decay", "0.01"],
]
SAME_WEIGHT_FLAGS = [
    ["--beam_size", "3"], ["--top_k_paths", "2"], ["--top_k_ops", "3"], ["--seg_threshold", "0.3"],
    ["--len_penalty", "0.1"], ["--no_trust_valid_cache"], ["--max_new_tokens", "8"], ["--num_samples", "2"],
    ["--eval_cache_breakdown"], ["--prompt_style", "chat"], ["--answer_mode", "lenient"], ["--fewshot", "2"],
    ["--eval_batch_size", "4"], ["--device", "cpu"], ["--use_wandb"], ["--wandb_project", "p"], ["--no_progress"],
    ["--delete_checkpoint_after_eval"], ["--eval"], ["--feature_cache_dir", "elsewhere"],
    ["--tensorboard_dir", "tb"], ["--trust_remote_code"], ["--lenpref_beta", "0.2"], ["--warmup_steps", "10"],
    ["--original_path_weight", "0.3"], ["--nan_lr_backoff", "0.5"], ["--amp_dtype", "bf16"],
    ["--dtype", "bfloat16"],  # the base model's dtype: no part of a hash-encoder training
]


def job_for(tiny_setup, *flags, data=None):
    root, model_dir, default_data = tiny_setup
    args = build_parser().parse_args([*BASE, "--model_path", str(model_dir), "--data_root", str(data or default_data),
                                      "--save_dir", str(root / "names"), *flags])
    return Job(args, log=lambda *_: None)


@pytest.fixture
def parse_once(monkeypatch):
    """Each Job reads the supervision file; parse it once for the many Jobs of a test."""
    import polar.data

    parsed, load = {}, polar.data.load_samples_with_metadata

    def load_once(path):
        if str(path) not in parsed:
            parsed[str(path)] = load(path)
        return parsed[str(path)]

    monkeypatch.setattr(polar.data, "load_samples_with_metadata", load_once)


def test_checkpoint_name_covers_every_flag_that_changes_the_weights(tiny_setup, parse_once):
    base = job_for(tiny_setup).checkpoint_path()
    names = {base}
    for flags in WEIGHT_FLAGS:
        path = job_for(tiny_setup, *flags).checkpoint_path()
        assert path not in names, flags
        names.add(path)
    for flags in SAME_WEIGHT_FLAGS:
        assert job_for(tiny_setup, *flags).checkpoint_path() == base, flags


def test_with_the_self_encoder_the_base_model_dtype_is_part_of_the_name(tiny_setup, parse_once):
    """``--encoder self`` trains on the base model's own states: a bfloat16 run gives other
    features than a float32 run, so it must not reuse the float32 checkpoint."""
    names = {}
    for dtype in (None, "float32", "bfloat16", "float16"):
        flags = ["--encoder", "self", "--device", "cpu"] + (["--dtype", dtype] if dtype else [])
        job = job_for(tiny_setup, *flags)
        names[dtype] = job.checkpoint_path()
        assert job.training_identity()["encoder"]["model_dtype"] == (dtype or "float32")
    assert names[None] == names["float32"]  # on CPU the default dtype is float32
    assert len({names["float32"], names["bfloat16"], names["float16"]}) == 3


def test_checkpoint_name_covers_the_training_data(tiny_setup, tmp_path):
    """Editing a training question's programs trains anew; editing a test question does not."""
    root, model_dir, data = tiny_setup
    base = job_for(tiny_setup).checkpoint_path()
    from polar.data import supervision_path

    original = json.loads(supervision_path(data, str(model_dir), 1).read_text())
    for index, expect_same in ((3, False), (1260, False), (1502, True)):
        edited = json.loads(json.dumps(original))
        edited["samples"][index]["final_valid_transitions"] = [[0, 1, 2, 3, 4, 5]]
        copy = tmp_path / f"data{index}"
        path = supervision_path(copy, str(model_dir), 1)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(edited))
        assert (job_for(tiny_setup, data=copy).checkpoint_path() == base) is expect_same, index


def test_data_root_that_already_ends_in_the_model_path_is_accepted(tiny_setup):
    from polar.data import model_dir_name, supervision_path

    root, model_dir, data = tiny_setup
    inner = data / model_dir_name(str(model_dir))
    assert supervision_path(inner, str(model_dir), 1) == supervision_path(data, str(model_dir), 1)
    assert job_for(tiny_setup, data=inner).checkpoint_path() == job_for(tiny_setup).checkpoint_path()
    # whole components only: a root that merely ends in the same letters is not the model folder
    assert supervision_path(data / f"x{inner.name}", str(model_dir), 1).parent.parent.name == inner.name


def quick(tiny_setup, *extra):
    return run(tiny_setup, "--num_epochs", "1", "--max_total_examples", "128", "--max_val_examples", "64",
               "--num_samples", "2", *extra)


def test_changed_flag_trains_anew_and_eval_of_a_foreign_checkpoint_warns(tiny_setup, capsys):
    root, _, _ = tiny_setup
    assert quick(tiny_setup, "--run_tag", "sweep") == 0
    (first,) = (root / "out" / "checkpoints").rglob("*_sweep_*.safetensors")
    capsys.readouterr()
    assert quick(tiny_setup, "--run_tag", "sweep", "--learning_rate", "1e-3") == 0
    out = capsys.readouterr().out
    assert "saved predictor checkpoint" in out and "skipping training" not in out
    assert len(list((root / "out" / "checkpoints").rglob("*_sweep_*.safetensors"))) == 2
    # evaluating the first checkpoint under the second run's flags: a warning naming the flag
    assert quick(tiny_setup, "--run_tag", "sweep", "--learning_rate", "1e-3", "--eval",
                 "--checkpoint_path", str(first)) == 0
    out = capsys.readouterr().out
    assert "warning: checkpoint" in out and "other settings than these flags" in out
    assert "training.learning_rate: 0.0005 (checkpoint) vs 0.001 (these flags)" in out
    assert list((root / "out" / "eval" / "tiny-llama").glob(f"eval_{first.stem}_diff1_eval*.json"))
    # the same flags: no warning
    assert quick(tiny_setup, "--run_tag", "sweep", "--eval", "--checkpoint_path", str(first)) == 0
    assert "warning" not in capsys.readouterr().out
    # --eval with flags nothing was trained with names the checkpoints that exist
    assert quick(tiny_setup, "--run_tag", "sweep", "--learning_rate", "2e-3", "--eval") == 2
    err = capsys.readouterr().err
    assert "no predictor checkpoint" in err and first.name in err and len(err.strip().splitlines()) == 1


def test_unfinished_checkpoint_is_retrained_and_a_foreign_one_is_never_overwritten(tiny_setup, capsys):
    root, _, _ = tiny_setup
    assert quick(tiny_setup, "--run_tag", "resume") == 0
    (ckpt,) = (root / "out" / "checkpoints").rglob("*_resume_*.safetensors")
    manifest = ckpt.with_suffix(".json")
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "complete": False}))
    capsys.readouterr()
    assert quick(tiny_setup, "--run_tag", "resume") == 0
    assert "is unfinished (its training was interrupted): training again" in capsys.readouterr().out
    assert json.loads(manifest.read_text())["complete"] is True
    # training into an explicit path that holds a checkpoint of other flags: refused, file kept
    before = ckpt.read_bytes()
    assert quick(tiny_setup, "--run_tag", "resume", "--batch_size", "64", "--checkpoint_path", str(ckpt)) == 2
    err = capsys.readouterr().err
    assert "exists but was trained with other settings (training.batch_size: 128 (checkpoint) vs 64" in err
    assert ckpt.read_bytes() == before


def test_checkpoint_named_without_a_hash_is_pointed_at_not_reused(tiny_setup, capsys):
    root, model_dir, _ = tiny_setup
    folder = root / "out" / "checkpoints" / "tiny-llama"
    folder.mkdir(parents=True, exist_ok=True)
    old = folder / "polar_polar_diff1_seed42_legacy.safetensors"
    old.write_bytes(b"")
    old.with_suffix(".json").write_text("{}")
    assert quick(tiny_setup, "--run_tag", "legacy") == 0
    out = capsys.readouterr().out
    assert f"note: {old} (named without a settings hash" in out and "saved predictor checkpoint" in out


def test_evaluation_settings_name_their_own_report(tiny_setup, capsys):
    """A sweep over evaluation flags keeps one report per setting: another --top_k_paths or
    --max_new_tokens writes beside the first report; the same flags rewrite the same file."""
    root, _, _ = tiny_setup
    assert quick(tiny_setup, "--run_tag", "evalsweep") == 0
    folder = root / "out" / "eval" / "tiny-llama"
    (first,) = folder.glob("eval_*_evalsweep_*.json")
    before = json.loads(first.read_text())
    assert before["settings"]["decode"]["top_k_paths"] == 3
    assert quick(tiny_setup, "--run_tag", "evalsweep", "--eval", "--top_k_paths", "1") == 0
    assert quick(tiny_setup, "--run_tag", "evalsweep", "--eval", "--max_new_tokens", "2") == 0
    reports = sorted(folder.glob("eval_*_evalsweep_*.json"))
    assert len(reports) == 3
    assert json.loads(first.read_text()) == before, "the first setting's report is untouched"
    settings = {json.loads(r.read_text())["settings"]["decode"]["top_k_paths"] for r in reports}
    assert settings == {1, 3}
    assert quick(tiny_setup, "--run_tag", "evalsweep", "--eval") == 0
    assert len(list(folder.glob("eval_*_evalsweep_*.json"))) == 3, "same flags: same report"
