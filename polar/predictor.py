"""The PoLar predictor: question token features in, one segment-start logit and three op
logits (skip / keep / repeat) per base layer out.

Two architectures, chosen by ``PredictorConfig.arch`` and recorded in every checkpoint:

* ``"release"`` (default): the authors' network (their ``polar/model.py``). Token features go
  through a linear ``q_proj`` to ``d_model``; each base layer owns a row of an embedding table,
  used as a query that cross-attends to the question tokens; the attention output itself (no
  residual, no LayerNorm) enters a stack of post-norm ``nn.TransformerEncoderLayer`` blocks over
  the layer axis, so neighbouring layers agree on segment boundaries; two linear heads read off
  the targets. 2,113,284 trainable parameters for D = 28, a 1024-d encoder and the default sizes.
* ``"prenorm"``: our earlier variant: LayerNorm on the projected tokens, small-init learned
  queries, a residual + LayerNorm around the cross-attention, pre-norm blocks and a final
  LayerNorm. Kept because checkpoints trained with it must keep loading and evaluating
  identically; checkpoints written before the architecture was recorded are of this kind.

Only the part after the frozen encoder is trained and saved. Checkpoints are two files side by
side: ``NAME.safetensors`` (weights) and ``NAME.json`` (architecture, depth ``D``, encoder spec,
prompt style, training flags, base model).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from polar.encoders import EncoderSpec
from polar.errors import CheckpointError
from polar.io import write_json_atomic

CHECKPOINT_FORMAT = "polar-predictor/1"
PREDICTOR_ARCHS = ("release", "prenorm")
LEGACY_ARCH = "prenorm"  # what a checkpoint without an ``arch`` field was trained with


@dataclass(frozen=True)
class PredictorConfig:
    """Architecture: enough to rebuild the module before loading weights."""

    num_layers: int  # D of the base model
    encoder_dim: int
    d_model: int = 256
    num_heads: int = 4
    num_blocks: int = 2
    dropout: float = 0.1
    arch: str = "release"

    def __post_init__(self) -> None:
        if self.arch not in PREDICTOR_ARCHS:
            raise ValueError(f"predictor arch must be one of {PREDICTOR_ARCHS}, got {self.arch!r}")


def _layer_mixer(config: PredictorConfig, norm_first: bool) -> nn.TransformerEncoder:
    """``num_blocks`` transformer blocks over the layer axis (ReLU MLP of width 4 * d_model)."""
    d = config.d_model
    block = nn.TransformerEncoderLayer(
        d, config.num_heads, dim_feedforward=4 * d, dropout=config.dropout,
        batch_first=True, norm_first=norm_first,
    )
    return nn.TransformerEncoder(block, config.num_blocks, enable_nested_tensor=False)


class PolarPredictor(nn.Module):
    """The release's network: embedding-table layer queries cross-attend to the question tokens;
    the attention output alone feeds post-norm blocks over the layer axis.

    Parameter names follow the release's module (``q_proj``, ``layer_embedding``, ``cross_attn``,
    ``layer_encoder``, ``seg_head``, ``op_head``), so its trained weights map one to one.
    """

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        if config.arch != "release":
            raise ValueError(f"PolarPredictor is the release architecture; use build_predictor for {config.arch!r}")
        self.config = config
        d = config.d_model
        self.q_proj = nn.Linear(config.encoder_dim, d)
        self.layer_embedding = nn.Embedding(config.num_layers, d)
        self.cross_attn = nn.MultiheadAttention(d, config.num_heads, dropout=config.dropout, batch_first=True)
        self.layer_encoder = _layer_mixer(config, norm_first=False)
        self.seg_head = nn.Linear(d, 1)
        self.op_head = nn.Linear(d, 3)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B, T, E]``, ``mask [B, T]`` (True = real token) ->
        ``seg_logits [B, D]``, ``op_logits [B, D, 3]``."""
        tokens = self.q_proj(features)
        queries = self.layer_embedding.weight.unsqueeze(0).expand(features.shape[0], -1, -1)
        attended, _ = self.cross_attn(queries, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        hidden = self.layer_encoder(attended)
        return self.seg_head(hidden).squeeze(-1), self.op_head(hidden)


class PrenormPredictor(nn.Module):
    """Our earlier variant (``arch="prenorm"``): normalised tokens, residual cross-attention,
    pre-norm blocks and a final LayerNorm."""

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.proj = nn.Linear(config.encoder_dim, d)
        self.token_norm = nn.LayerNorm(d)
        self.layer_queries = nn.Parameter(torch.randn(config.num_layers, d) * 0.02)
        self.cross_attn = nn.MultiheadAttention(d, config.num_heads, dropout=config.dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(d)
        self.layer_mixer = _layer_mixer(config, norm_first=True)
        self.out_norm = nn.LayerNorm(d)
        self.seg_head = nn.Linear(d, 1)
        self.op_head = nn.Linear(d, 3)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as :meth:`PolarPredictor.forward`."""
        tokens = self.token_norm(self.proj(features))
        queries = self.layer_queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        attended, _ = self.cross_attn(queries, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        hidden = self.cross_norm(queries + attended)
        hidden = self.out_norm(self.layer_mixer(hidden))
        return self.seg_head(hidden).squeeze(-1), self.op_head(hidden)


Predictor = Union[PolarPredictor, PrenormPredictor]


def build_predictor(config: PredictorConfig) -> Predictor:
    """A freshly initialised network of the architecture ``config.arch`` names."""
    return PolarPredictor(config) if config.arch == "release" else PrenormPredictor(config)


def pad_features(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length ``[T_i, E]`` matrices into ``[B, T, E]`` plus a validity mask."""
    longest = max(f.shape[0] for f in features)
    batch = torch.zeros(len(features), longest, features[0].shape[1])
    mask = torch.zeros(len(features), longest, dtype=torch.bool)
    for row, f in enumerate(features):
        batch[row, : f.shape[0]] = f
        mask[row, : f.shape[0]] = True
    return batch, mask


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A loaded predictor plus everything needed to use it the way it was trained."""

    model: Predictor
    encoder: EncoderSpec
    meta: dict[str, Any]  # model_path, prompt style, training flags, ...

    @property
    def num_layers(self) -> int:
        return self.model.config.num_layers


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """``x``, ``x.safetensors`` or ``x.json`` -> (weights file, JSON file)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_checkpoint(
    path: str | Path, model: Predictor, encoder: EncoderSpec, meta: dict[str, Any]
) -> Path:
    """Write weights then JSON (each atomically); the JSON appearing marks a complete checkpoint."""
    import os

    from safetensors.torch import save_file

    weights, manifest = checkpoint_files(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    write_json_atomic(
        manifest,
        {
            "format": CHECKPOINT_FORMAT,
            "predictor": asdict(model.config),
            "num_layers": model.config.num_layers,
            "encoder": encoder.to_dict(),
            **meta,
        },
    )
    return weights


def refuse_pickle_checkpoint(path: str | Path) -> None:
    """Refuse a pickle file (``.pt``, ``.bin``, a ``torch.save`` archive under any name) given as a
    checkpoint, without reading more than its first bytes: unpickling can run any code."""
    from polar.model_files import refuse_pickle_file

    for file in (Path(path), checkpoint_files(path)[0]):
        refuse_pickle_file(file, hint="polar checkpoints are NAME.safetensors + NAME.json, as polar train writes them")


def load_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """A checkpoint's JSON manifest (architecture, encoder, base model, prompt style, training
    flags), checked, without reading the weights: what a caller needs to know before it loads
    the base model the checkpoint was trained for (``polar run --checkpoint``). Pickle files are
    refused (:func:`refuse_pickle_checkpoint`).
    """
    refuse_pickle_checkpoint(path)
    weights, manifest = checkpoint_files(path)
    if not weights.exists() or not manifest.exists():
        missing = weights if not weights.exists() else manifest
        raise CheckpointError(f"predictor checkpoint not found: {missing}")
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{manifest}: not a predictor checkpoint manifest ({type(err).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("predictor"), dict):
        raise CheckpointError(f"{manifest}: not a predictor checkpoint manifest (no 'predictor' object)")
    return meta


def load_checkpoint(
    path: str | Path, num_layers: int | None = None, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load a checkpoint; ``num_layers`` (the base model's depth) is checked against it."""
    from polar.model_files import read_safetensors_header

    weights, manifest = checkpoint_files(path)
    meta = load_checkpoint_info(path)
    try:
        architecture = dict(meta.pop("predictor"))
        architecture.setdefault("arch", LEGACY_ARCH)  # written before the arch was recorded
        config = PredictorConfig(**architecture)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{manifest}: not a predictor checkpoint manifest ({err})") from None
    if num_layers is not None and config.num_layers != num_layers:
        raise CheckpointError(
            f"{weights} was trained for a model with {config.num_layers} layers, but this model "
            f"has {num_layers}; train a predictor for this model"
        )
    header = read_safetensors_header(weights)  # pickle, truncation, garbage: one line naming the file
    model = build_matching(lambda: build_predictor(config), header, weights, manifest)
    model.load_state_dict(_read_weights(weights))
    model.to(device).eval()
    encoder = EncoderSpec.from_dict(meta.pop("encoder", {}))
    meta.pop("format", None)
    return Checkpoint(model=model, encoder=encoder, meta=meta)


def build_matching(build, header: dict[str, Any], weights: Path, manifest: Path) -> nn.Module:
    """Build the module a manifest describes only once its parameter shapes equal those the
    weights file declares: the module is first built on the ``meta`` device (no memory), so a
    manifest that asks for absurd sizes, or weights of another architecture, cost nothing and
    get an error naming the file."""
    try:
        with torch.device("meta"):
            expected = {k: list(v.shape) for k, v in build().state_dict().items()}
    except (TypeError, ValueError, RuntimeError, AssertionError, OverflowError) as err:
        raise CheckpointError(f"{manifest}: the predictor settings are not buildable ({err})") from None
    stored = {k: v.get("shape") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    if stored != expected:
        wrong = sorted(set(stored) ^ set(expected)) or sorted(k for k in expected if stored[k] != expected[k])
        key = wrong[0]
        raise CheckpointError(
            f"{weights}: weights do not match the manifest {manifest.name} ({key}: "
            f"stored {stored.get(key, 'missing')}, expected {expected.get(key, 'none')})"
        )
    return build()


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from polar.model_files import first_line

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable weights ({first_line(err)})") from None
    for name, tensor in tensors.items():
        # load_state_dict would cast integers into the float parameters; NaN or inf weights (a
        # diverged run) decode the same nonsense program for every question
        if not tensor.is_floating_point():
            raise CheckpointError(f"{weights}: {name} is stored as {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights}: {name} holds NaN or infinite values (did training diverge?)")
    return tensors
