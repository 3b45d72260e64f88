"""Checks on model folders and weight files, made before any library reads them.

Weights are data, and reading data must never run code. Two things in a model folder can run
code: the folder's own Python modules (``auto_map`` in ``config.json``, imported by transformers
under ``trust_remote_code``) and pickle weights (``pytorch_model.bin``, ``*.pt``: unpickling can
call any function). polar runs the first only when the user passes ``--trust_remote_code`` and
never reads the second; it reads safetensors and GGUF. A damaged file (truncated download,
garbage bytes) is named in a one-line error here instead of failing deep inside a loader; so is
a ``config.json`` that does not match its weights (transformers would fill the gap with random
or enormous tensors); and a path-looking argument that does not exist is reported as a missing
path, not as a hub id the network could not find.

These checks cover local folders and files; for hub ids the loaders pass
``trust_remote_code`` and ``use_safetensors=True`` explicitly, which keeps the same promises.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from polar.errors import ModelFileError, UnsafeModelError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NOT_WEIGHTS = ("training_args.bin",)  # pickles a checkout may hold that no loader reads
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})  # safetensors dtype names
_HUB_ID = re.compile(r"^[A-Za-z0-9_](?:[\w.-]*[\w])?(?:/[A-Za-z0-9_](?:[\w.-]*[\w])?)?$")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".json") + PICKLE_SUFFIXES
TRUST_FLAG = "--trust_remote_code"
# decoder / encoder layer weights: model.layers.N. (Llama, Qwen, Mistral), h.N. (GPT-2), encoder.layer.N. (BERT)
_LAYER_WEIGHT = re.compile(r"^(?:[A-Za-z_]+\.)?(?:layers|h|encoder\.layer|decoder\.layers)\.(\d+)\.")


# --------------------------------------------------------------------------- paths


def looks_like_path(name: str) -> bool:
    """True when ``name`` cannot be a hub id (``owner/name``), so it can only mean a local path:
    absolute or home-relative, ``./`` or ``../``, more than one slash, or a weight-file suffix."""
    return (
        not _HUB_ID.match(name)
        or ".." in name
        or "--" in name
        or name.lower().endswith(_FILE_SUFFIXES)
    )


def local_model_path(name: str, what: str = "model") -> Path | None:
    """The local file or folder ``name`` names, ``None`` for a hub id; a path that does not exist
    is an error here, so it is never sent to the hub and reported as "unreachable"."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if looks_like_path(name):
        raise ModelFileError(f"{what} not found: {name} (no such file or folder)")
    return None


# --------------------------------------------------------------------------- pickle


def pickle_kind(head: bytes) -> str | None:
    """What a file's first bytes say it is, when that is a pickle container."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (the torch.save format, pickle inside)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle stream"
    return None


def _read_head(path: Path, size: int = 8) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def pickle_refusal(file: Path, folder: Path | None = None, what: str = "model") -> UnsafeModelError:
    """The one-line refusal for pickle weights, with the command that converts them."""
    reason = f"{file}: pickle weights are refused (unpickling can run any code the file holds); polar reads safetensors or GGUF only"
    if folder is None:
        return UnsafeModelError(f"{reason}: pass a {what} folder with safetensors weights, or a .gguf file")
    auto = "AutoModel" if what == "encoder" else "AutoModelForCausalLM"
    return UnsafeModelError(
        f"{reason}. Convert the folder once, where you trust it: python -c \"from transformers import {auto}; "
        f"{auto}.from_pretrained('{folder}').save_pretrained('{folder}')\""
    )


def refuse_pickle_file(path: Path, hint: str | None = None, what: str = "model") -> None:
    """Raise when ``path`` has a pickle suffix or starts like a pickle, whatever its name says.

    ``hint`` replaces the conversion command in the message (for files that are not plain
    weights, such as predictor checkpoints)."""
    if not path.is_file():
        return
    kind = pickle_kind(_read_head(path))
    if path.suffix.lower() not in PICKLE_SUFFIXES and not kind:
        return
    if hint is None:
        raise pickle_refusal(path, None, what)
    raise UnsafeModelError(f"{path}: {kind or 'a pickle file'} is refused without being read "
                           f"(unpickling can run any code it holds); {hint}")


# --------------------------------------------------------------------------- safetensors and GGUF


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that the file is one and is whole.

    A safetensors file is an 8-byte little-endian header length, a JSON header giving every
    tensor's dtype, shape and byte range, then the bytes; the ranges must end exactly at the end
    of the file. Checking that costs one small read and turns a truncated download or garbage
    bytes into an error that names the file. A pickle saved under a ``.safetensors`` name is
    refused without being read further.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        kind = pickle_kind(head)
        if kind:
            raise UnsafeModelError(
                f"{path}: holds {kind}, not safetensors; polar never unpickles (it can run any code)"
            )
        if len(head) < 8:
            raise ModelFileError(f"{path}: truncated or empty safetensors file ({size} bytes)")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ModelFileError(
                f"{path}: not a safetensors file, or a damaged one (its header length {length} "
                f"does not fit in {size} bytes)"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelFileError(f"{path}: not a safetensors file, or a damaged one (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelFileError(f"{path}: damaged safetensors header (tensor {name!r} has no valid data_offsets)")
        end = max(end, offsets[1])
    expected = 8 + length + end
    if expected != size:
        state = "truncated" if size < expected else "damaged"
        raise ModelFileError(
            f"{path}: {state} safetensors file ({size} bytes; its header describes {expected}); "
            "download or copy it again"
        )
    return header


def check_gguf_file(path: Path) -> None:
    """A ``.gguf`` path must start with the GGUF magic (a pickle under that name is refused)."""
    head = _read_head(path, 4)
    if pickle_kind(head):
        raise pickle_refusal(path)
    if head != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


# --------------------------------------------------------------------------- folders


def check_model_folder(folder: Path, what: str = "model", trust_remote_code: bool = False) -> None:
    """Everything polar promises about a local model or encoder folder, checked before loading:
    a ``config.json``, no custom code unless trusted, safetensors weights that are whole."""
    if folder.is_file():
        if folder.suffix.lower() == ".gguf":
            check_gguf_file(folder)
            return
        refuse_pickle_file(folder, what=what)
        raise ModelFileError(
            f"{folder}: a {what} is loaded from its folder (with config.json) or a .gguf file, not from this file"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f"; to load the GGUF file, pass it itself: {ggufs[0]}" if ggufs else ""
        raise ModelFileError(f"{folder}: no config.json, so not a Hugging Face {what} folder{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ModelFileError(f"{config_path}: not valid JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{config_path}: expected a JSON object")
    if not trust_remote_code:
        check_no_custom_code(folder, config, what)
    headers = check_weights(folder, what)
    check_layer_count(config_path, config, headers)
    check_shapes(folder, headers, what, trust_remote_code)


def _code_files(auto_map: dict) -> list[str]:
    """``{"AutoConfig": "pkg.Cls", "AutoTokenizer": ["mod.Tok", null], ...}`` -> module file names."""
    refs: list[str] = []
    for value in auto_map.values():
        refs.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
    return sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs})


def check_no_custom_code(folder: Path, config: dict, what: str = "model") -> None:
    """Refuse a folder whose model class exists only in its own Python code.

    With ``trust_remote_code=False`` transformers never imports that code, but it would either
    ask on the terminal (when the flag is left unset) or fail with a long message; we say it in
    one line first. A folder that ships code for an architecture transformers already has loads
    with the built-in classes, and we say that instead.
    """
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        return
    from transformers import CONFIG_MAPPING

    files = ", ".join(_code_files(auto_map)) or "auto_map"
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        log.warning("%s ships its own code (%s); using the built-in %s classes of transformers instead "
                    "(pass %s to run the folder's code)", folder, files, model_type, TRUST_FLAG)
        return
    raise UnsafeModelError(
        f"{folder}: this {what} needs its own Python code ({files}) to load, and polar runs a folder's "
        f"code only with {TRUST_FLAG} (read the code first)"
    )


def check_weights(folder: Path, what: str = "model") -> dict[Path, dict[str, Any]]:
    """Safetensors (each one whole) or nothing; pickle-only folders are refused with a fix.
    Returns each weight file's header."""
    headers = {file: read_safetensors_header(file) for file in sorted(folder.glob("*.safetensors"))}
    if headers:
        return headers
    pickles = sorted(
        f for f in folder.iterdir()
        if f.suffix.lower() in PICKLE_SUFFIXES and f.name not in NOT_WEIGHTS and f.is_file()
    )
    if pickles:
        raise pickle_refusal(pickles[0], folder, what)
    raise ModelFileError(f"{folder}: no weights in this {what} folder (expected model.safetensors)")


def check_layer_count(config_path: Path, config: dict, headers: dict[Path, dict[str, Any]]) -> None:
    """A config that declares more layers than the weights hold is refused: transformers would
    build the missing layers with random weights (silently wrong answers) or, for an absurd
    count, spend unbounded time and memory building them."""
    declared = config.get("num_hidden_layers")
    if not isinstance(declared, int) or isinstance(declared, bool):
        return
    indices = {int(m.group(1)) for header in headers.values() for name in header
               if (m := _LAYER_WEIGHT.match(name))}
    if indices and declared > max(indices) + 1:
        raise ModelFileError(
            f"{config_path}: num_hidden_layers is {declared}, but the weights hold layers "
            f"0..{max(indices)} only; the folder's config and weights do not belong together"
        )


def check_shapes(folder: Path, headers: dict[Path, dict[str, Any]], what: str, trust_remote_code: bool) -> None:
    """Every weight the config implies must have the shape the files declare.

    transformers resolves a mismatch by building the tensor from the config, so a config that
    asks for ``hidden_size: 10000000`` allocates tens of gigabytes before anything fails. The
    model is built here on the ``meta`` device (no memory) and its shapes compared with the
    headers; a config transformers cannot build is left to the loader to explain.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    auto = AutoModel if what == "encoder" else AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            expected = auto.from_config(config, trust_remote_code=trust_remote_code).state_dict()
    except Exception:  # unbuildable or unusual configs: the real load reports them, naming the folder
        return
    quantized = getattr(config, "quantization_config", None) is not None
    for file, header in headers.items():
        for name, info in header.items():
            if name not in expected or not isinstance(info, dict):
                continue
            if list(expected[name].shape) != info.get("shape"):
                raise ModelFileError(
                    f"{folder / 'config.json'}: {name} has shape {list(expected[name].shape)} by this config, "
                    f"but {file.name} holds {info.get('shape')}; the folder's config and weights do not belong together"
                )
            if expected[name].is_floating_point() and not quantized and info.get("dtype") not in FLOAT_DTYPES:
                # transformers would cast the integers to floats: a model that runs and answers nonsense
                raise ModelFileError(
                    f"{file}: {name} is stored as {info.get('dtype')}, but this {what}'s weights are floating point "
                    f"({', '.join(sorted(FLOAT_DTYPES))}) and its config declares no quantization"
                )


def remote_code_error(err: Exception, source: str, what: str = "model") -> UnsafeModelError | None:
    """transformers' refusal of custom code (a multi-line ValueError) as our one-line error."""
    if isinstance(err, ValueError) and "trust_remote_code" in str(err):
        return UnsafeModelError(
            f"{source}: this {what} needs its own Python code to load, and polar runs it only with "
            f"{TRUST_FLAG} (read the code first)"
        )
    return None


def first_line(err: BaseException) -> str:
    """An exception as one line: its first non-empty line, else its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
