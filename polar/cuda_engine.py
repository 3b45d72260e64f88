"""CUDA fast path for :class:`polar.engine.ProgramRunner`: static KV buffers and per-layer CUDA graphs.

Decoding one token of a 3B model at batch 1 reads ~6 GB of weights (~1.5 ms on an H200), but
running the HF layers eagerly costs tens of milliseconds of CPU-side launches. This module keeps
the engine's semantics (every program position owns its KV state; see :mod:`polar.engine`) and
removes that overhead, without ever capturing a graph *per program*: search evaluates thousands
of distinct programs, so graphs must be reusable across programs.

**Schedule.** A batch is merged into steps ``(layer, rows)`` as for the eager backend
(:func:`polar.schedule.build_schedule`): sweeps over ``0..D-1`` shared by all rows, plus extra
steps for the rows that repeat or jump. Each step is served by a *slot*: the KV buffers
``[bucket, Hkv, Tcap, d]`` for that step's rows, a row-index vector, and one CUDA graph that runs
``layer`` on those rows. ``bucket`` is the step's row count rounded up to a power of two, at least
2 in a multi-row batch (padding rows point at a scratch row), ``Tcap`` the prompt width plus
``max_new_tokens`` rounded up to :data:`TIME_BLOCK`. A slot is keyed by ``(layer, bucket, dense)`` only; which step of which
program it serves is data (its row-index vector and its KV contents). A new batch of programs
takes free slots from the pool and captures graphs only for keys it has never needed, so after a
few batches new programs run with no capture at all.

**Decode step.** All graphs read and write one workspace of static tensors: the hidden state of
every row ``[R, 1, H]``, the additive attention mask ``[R, 1, 1, Tcap]``, rotary cos/sin and
positions, and the current column. A step's graph gathers its rows (or slices them, when the
rows are ``0..b-1`` — "dense", the common full-batch case), runs the model's own HF decoder
layer with a cache object whose ``update`` writes k/v at the current column of the slot's
buffers and returns the full buffers, and scatters the result back. Attention reads only each
row's valid columns (:mod:`polar.decode_attention`, Triton; masked SDPA over the whole buffer
where Triton is unavailable), grouped-query without copying KV. One more graph per row bucket
does final norm, LM head, argmax, embeds the new token and advances column, mask and rotary
angles. A decode step is thus ``#steps + 1`` graph replays and one device-to-host copy of the
new tokens (needed to detect stop tokens). Batches of a few rows, whose time is launch-bound,
replay all steps of a token as one graph instead.

**Per-layer speed-ups (defaults with graphs).** Llama-family layers run :func:`_fused_layer`
(q/k/v and gate/up as one matmul each, weights re-pointed at slices of one matrix, checked against
the HF layer once), and the layer and head bodies are wrapped in ``torch.compile`` before capture,
so the graph holds a few fused kernels instead of ~40 small ones; the row count and KV capacity
are dynamic dimensions, so one compiled graph serves every bucket above one row. Batch 1, the
latency case, gets its own graph in which q/k/v (with norm, rotary and KV writes), o_proj and down
(with SiLU·up and residuals) are one-row Triton kernels (:mod:`polar.gemv`; option ``row_gemv``)
and the argmax runs in two stages. Stop tokens are read one token behind, so the host never stalls
the GPU.

**Prefill** is compute-bound, so it runs eagerly through :func:`polar.prefill.prefill` (length
groups, full-depth prefixes from the runner's prompt cache) with a sink that writes into the slots.

**Early exit.** When rows finish, a step whose live rows fit half its bucket moves their KV into a
slot of the smaller bucket; otherwise the finished rows keep running and their tokens are dropped,
so captured graphs stay valid and a batch is reorganised at most log2(rows) times. A step whose
rows all finished is skipped.

**Memory.** Before a batch allocates KV slots, :meth:`CudaGraphDecoder._make_room` frees what only
saves time (other workspaces, idle slots, the prompt cache); if the slots still do not fit it
raises out-of-memory, and the runner runs the batch in halves.

Architectures with data-dependent control flow in a layer (MoE routing) or sliding-window layers
are not supported (:meth:`CudaGraphDecoder.supports`); the runner keeps its generic path for them.
With ``use_graphs=False`` the same static-buffer code runs eagerly, which is how CPU tests check
this module against the generic path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from polar.prefill import prefill
from polar.schedule import build_schedule

if TYPE_CHECKING:
    from polar.engine import ProgramRunner

#: KV capacity granularity: ``Tcap`` is a multiple of this, so prompts of similar length share
#: workspaces (and graphs), while attention reads at most this many unused columns per row.
TIME_BLOCK = 128

#: Name under which the decode attention is registered with transformers' attention interface.
ATTENTION_NAME = "polar_static_kv"


def bucket_for(n: int) -> int:
    """Smallest power of two >= n: batch sizes are padded to these so graphs are few."""
    return 1 << max(n - 1, 0).bit_length()


def _static_kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One-query attention over a full static KV buffer, grouped-query without copying KV.

    The query heads that share a KV head become that head's "queries" ``[b, Hkv, rep, d]``, so
    SDPA reads each KV head once; HF's own SDPA path would ``repeat_kv`` the whole ``Tcap``
    buffer when a mask is given, which costs more than the attention itself.
    """
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, (heads // kv_heads) * q_len, d)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, q_len, d).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _static_kv_attention)


# --------------------------------------------------------------------------- cache objects


class _SlotWriter:
    """Cache object for a decode step: write k/v at the current column, return full buffers."""

    def __init__(self, column: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        self.column, self.keys, self.values = column, keys, values

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        self.keys.index_copy_(2, self.column, key)
        self.values.index_copy_(2, self.column, value)
        return self.keys, self.values

    def get_seq_length(self, *args: Any) -> int:
        return 0


class _SlotSink:
    """Where prefill puts KV (:class:`polar.prefill.KVSink`): step ``s``'s k/v go into its slot."""

    def __init__(self, slots: list["_Slot"]):
        self.slots = slots

    def store(self, step: int, members: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offset: int) -> None:
        slot = self.slots[step]
        end = offset + key.shape[-2]
        slot.keys[members, :, offset:end] = key
        slot.values[members, :, offset:end] = value


def _call_layer(
    layer: torch.nn.Module, h: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
    pe: tuple[torch.Tensor, torch.Tensor], cache: dict[str, Any],
) -> torch.Tensor:
    """One HF decoder layer on decode inputs (a function, so torch.compile can wrap it)."""
    out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe, **cache, use_cache=True)
    return out[0] if isinstance(out, tuple) else out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout the HF Llama family uses."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(eq=False)
class _FusedWeights:
    """One layer's q/k/v and gate/up projections as single matrices (see :func:`fuse_projections`)."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    split: tuple[int, int, int]

    def args(self) -> tuple[Any, ...]:
        """Positional arguments of :func:`_fused_layer` after the layer."""
        return self.qkv, self.qkv_bias, self.gate_up, self.gate_up_bias, self.split


#: Architectures whose decoder layer is exactly: norm, q/k/v (optional per-head q/k norms),
#: rotary, attention, o_proj, residual, norm, gated MLP, residual. Others keep the HF layer.
FUSABLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def fuse_projections(layer: torch.nn.Module) -> _FusedWeights | None:
    """Put a Llama-family layer's q/k/v weights (and gate/up weights) into one contiguous matrix
    each and re-point the original ``Linear`` weights at slices of it.

    Why: at decode batch sizes every projection is a separate memory-bound GEMV with its own
    launch; one ``[q;k;v]`` and one ``[gate;up]`` matmul read the same bytes in 2 launches
    instead of 5. Re-pointing (instead of copying) keeps memory unchanged, and the HF layer,
    which still reads ``q_proj.weight`` etc., computes exactly what it did. Returns None when the
    layer does not have the expected modules.
    """
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (mlp, "gate_proj"), (mlp, "up_proj")]
    if attn is None or mlp is None or not all(isinstance(getattr(m, n, None), torch.nn.Linear) for m, n in names):
        return None
    if not all(hasattr(m, n) for m, n in [(attn, "o_proj"), (mlp, "down_proj"), (mlp, "act_fn"),
                                          (layer, "input_layernorm"), (layer, "post_attention_layernorm")]):
        return None

    def fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = torch.cat([l.weight.detach() for l in linears], 0)
        bias = None
        if any(l.bias is not None for l in linears):
            bias = torch.cat([l.bias.detach() if l.bias is not None else weight.new_zeros(l.out_features)
                              for l in linears], 0)
        start = 0
        for l in linears:
            end = start + l.out_features
            l.weight = torch.nn.Parameter(weight[start:end], requires_grad=l.weight.requires_grad)
            if l.bias is not None:
                l.bias = torch.nn.Parameter(bias[start:end], requires_grad=l.bias.requires_grad)
            start = end
        return weight, bias

    split = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
    qkv, qkv_bias = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up, gate_up_bias = fuse([mlp.gate_proj, mlp.up_proj])
    return _FusedWeights(qkv, qkv_bias, gate_up, gate_up_bias, split)


def _fused_layer(
    layer: torch.nn.Module, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, gate_up_weight: torch.Tensor,
    gate_up_bias: torch.Tensor | None, split: tuple[int, int, int], h: torch.Tensor, mask: torch.Tensor | None,
    pe: tuple[torch.Tensor, torch.Tensor], column: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    start: torch.Tensor | None = None, one_row: bool = False,
) -> torch.Tensor:
    """One decode step of a Llama-family layer with fused projections, writing k/v at ``column``
    of the slot buffers. Checked against the HF layer in the tests and once per decoder.

    Attention: with ``start`` (each row's first valid column), the Triton kernel of
    :mod:`polar.decode_attention` reads only columns ``start .. column``; otherwise masked SDPA
    over the whole buffer. ``one_row`` (batch 1, Triton): q/k/v, o_proj and down run as
    :mod:`polar.gemv` kernels with the norm, rotary and KV writes (q/k/v; not with per-head q/k
    norms), SiLU·up and residual adds fused in. The fused weights come as plain tensors (not a
    dataclass), so that torch.compile treats them as graph inputs and every layer shares one
    compiled graph."""
    attn, mlp = layer.self_attn, layer.mlp
    b, d = h.shape[0], keys.shape[-1]
    norm = layer.input_layernorm
    if one_row and not hasattr(attn, "q_norm"):  # norm, q/k/v, rotary and the KV writes: one kernel
        q = torch.ops.polar.qkv_rope(h.reshape(-1), norm.weight, norm.variance_epsilon, qkv_weight, qkv_bias,
                                     pe[0].reshape(-1), pe[1].reshape(-1), column, keys, values)
        q = q.view(1, -1, 1, d)
    else:
        if one_row:
            qkv = torch.ops.polar.gemv(h.reshape(-1), qkv_weight, qkv_bias, None, "rmsnorm", norm.weight, norm.variance_epsilon)
            qkv = qkv.view(1, 1, -1)
        else:
            qkv = F.linear(norm(h), qkv_weight, qkv_bias)
        q, k, v = qkv.split(split, dim=-1)
        q, k, v = q.view(b, 1, -1, d), k.view(b, 1, -1, d), v.view(b, 1, -1, d)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = pe[0][:, None], pe[1][:, None]
        q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
        keys.index_copy_(2, column, k.to(keys.dtype))
        values.index_copy_(2, column, v.transpose(1, 2).to(values.dtype))
    scaling = getattr(attn, "scaling", d ** -0.5)
    if start is not None:
        out = torch.ops.polar.decode_attention(q[:, :, 0], keys, values, start, column, float(scaling))[:, None]
    else:
        out, _ = _static_kv_attention(attn, q, keys, values, mask, scaling=scaling)
    if one_row:  # gate/up stays on cuBLAS: faster there for its 100 MB matrix (bench/gemv.py)
        gemv, o_proj, down = torch.ops.polar.gemv, attn.o_proj, mlp.down_proj
        h = gemv(out.reshape(-1), o_proj.weight, o_proj.bias, h.reshape(-1), "none", None, 0.0)
        gate_up = F.linear(layer.post_attention_layernorm(h), gate_up_weight, gate_up_bias)
        return gemv(gate_up, down.weight, down.bias, h, "silu_mul", None, 0.0).view(1, 1, -1)
    h = h + attn.o_proj(out.reshape(b, 1, -1))
    x = layer.post_attention_layernorm(h)
    gate, up = F.linear(x, gate_up_weight, gate_up_bias).chunk(2, dim=-1)
    return h + mlp.down_proj(mlp.act_fn(gate) * up)


def _row_argmax(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``logits.argmax(-1)`` for one row, in two stages (the best of each block of ``block``
    columns, then the best block), so the reduction spreads over many programs instead of one
    (measured: ~30 µs per token for a 128k vocabulary in one program). First index of the
    maximum, as ``argmax``: each stage keeps the first of equals, and blocks are in order."""
    vocab = logits.shape[-1]
    padded = F.pad(logits.float(), (0, -vocab % block), value=float("-inf")).view(-1, block)
    best, index = padded.max(-1)
    chunk = best.argmax().view(1)
    return chunk * block + index.gather(0, chunk)  # gather, not index[chunk]: no host sync in a graph


def _head_math(
    norm: torch.nn.Module, lm_head: torch.nn.Module, embed: torch.nn.Module, h: torch.Tensor, one_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final norm, LM head, greedy token and its embedding (a function, so it can be compiled).
    ``one_row``: the argmax in two stages (:func:`_row_argmax`)."""
    logits = lm_head(norm(h))[:, -1]
    tokens = _row_argmax(logits) if one_row else logits.argmax(-1)
    return logits, tokens, embed(tokens)[:, None]


def _dynamic_rows(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that the row count (dim 0) and the KV capacity vary, so one compiled
    graph serves every bucket above one row and every prompt width (batch 1 keeps its own,
    specialised graph: it is the latency case)."""
    for t in tensors:
        if t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        if t.dim() == 4:  # mask [rows, 1, 1, Tcap] and KV [rows, Hkv, Tcap, d]
            torch._dynamo.maybe_mark_dynamic(t, 3 if t.shape[1] == 1 and t.shape[2] == 1 else 2)


# --------------------------------------------------------------------------- workspace


@dataclass(eq=False)
class _Slot:
    """KV buffers and graph for one schedule step; reused by any step with the same key."""

    layer: int
    bucket: int
    dense: bool  # rows are 0..bucket-1: slice instead of gather/scatter
    rows: torch.Tensor  # long [bucket]: workspace rows (padding -> scratch row)
    keys: torch.Tensor  # [bucket, Hkv, Tcap, d]
    values: torch.Tensor
    members: list[int] = field(default_factory=list)  # batch row per slot position, -1 = none
    graph: Any = None
    in_use: bool = False


@dataclass(eq=False)
class _Head:
    """Final norm + LM head + argmax + next-token embedding for one row bucket."""

    bucket: int
    dense: bool
    rows: torch.Tensor  # long [bucket]
    tokens: torch.Tensor  # long [bucket]
    logits: torch.Tensor  # [bucket, V], model dtype (kept for tests and diagnostics)
    members: list[int] = field(default_factory=list)  # batch row per position, -1 = none
    graph: Any = None


class _Workspace:
    """Static tensors shared by all graphs of one KV capacity ``tcap`` and up to ``max_rows`` rows."""

    def __init__(self, runner: "ProgramRunner", max_rows: int, tcap: int):
        device, dtype = runner.device, runner.dtype
        self.tcap = tcap
        self.max_rows = max_rows
        self.scratch = max_rows  # padding rows of a bucket read and write this row
        rows = max_rows + 1
        hidden_size = runner._backbone.embed_tokens.weight.shape[1]
        self.hidden = torch.zeros(rows, 1, hidden_size, device=device, dtype=dtype)
        self.mask = torch.zeros(rows, 1, 1, tcap, device=device, dtype=dtype)
        self.positions = torch.zeros(rows, 1, device=device, dtype=torch.long)
        cos, sin = runner._backbone.rotary_emb(self.hidden, self.positions)
        self.cos, self.sin = cos.clone(), sin.clone()
        self.column = torch.zeros(1, device=device, dtype=torch.long)
        # first valid KV column of each row (past the last column: the row attends to nothing)
        self.start = torch.full((rows,), tcap, device=device, dtype=torch.int32)
        self.slots: dict[tuple[int, int, bool], list[_Slot]] = {}
        self.heads: dict[tuple[int, bool], _Head] = {}
        # whole-token graphs (every active step of a token; the head replays apart), keyed by slots
        self.token_graphs: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def state(self) -> list[torch.Tensor]:
        """Tensors a graph's warm-up run modifies, to be restored before capture."""
        return [self.hidden, self.mask, self.positions, self.cos, self.sin, self.column, self.start]

    def drop_idle_slots(self) -> None:
        """Free the buffers (and graphs) of slots no running batch holds."""
        for key, pool in list(self.slots.items()):
            pool[:] = [slot for slot in pool if slot.in_use]
            if not pool:
                del self.slots[key]
        self.token_graphs.clear()  # they may replay dropped slots


# --------------------------------------------------------------------------- decoder


class CudaGraphDecoder:
    """Static-buffer, graph-replayed decoding for a :class:`ProgramRunner` (see module docstring).

    ``generate_chunk`` has the generic backend's contract and results (up to floating-point ties).
    Options (all on by default with graphs; each can be switched off without changing results):
    ``compile_layers`` (torch.compile of the layer and head bodies), ``fuse`` (fused projections),
    ``token_graphs`` (one graph per decode token for batches of at most ``token_graph_rows`` rows,
    so small batches pay one launch per token instead of one per step), ``triton_attention``,
    ``row_gemv`` (batch-1 projections as :mod:`polar.gemv` kernels).
    """

    def __init__(
        self, runner: "ProgramRunner", use_graphs: bool | None = None, max_workspaces: int = 4,
        compile_layers: bool | None = None, fuse: bool | None = None, token_graphs: bool | None = None,
        token_graph_rows: int = 8, triton_attention: bool | None = None, row_gemv: bool | None = None,
    ):
        _register_attention()
        self.runner = runner
        self.use_graphs = runner.device.type == "cuda" if use_graphs is None else use_graphs
        self.max_workspaces = max_workspaces
        self._workspaces: OrderedDict[int, _Workspace] = OrderedDict()
        attn_configs = {id(layer.self_attn.config): layer.self_attn.config for layer in runner._layers}
        self._attn_configs = list(attn_configs.values())
        self._kv_heads, self._head_dim = runner.kv_shape
        self.capture_logits = False  # tests: keep each step's logits in `last_logits`
        self.last_logits: list[torch.Tensor] = []
        self.graphs_captured = 0
        self.slots_created = 0
        self.compactions = 0
        self._min_bucket = 1
        self._warm: set[tuple] = set()  # shapes whose bodies already ran (compiled, libraries loaded)
        self.capture_seconds = 0.0  # warm-ups (compiles included) and captures
        self.token_graphs = self.use_graphs if token_graphs is None else bool(token_graphs)
        self.token_graph_rows = token_graph_rows
        # Fused q/k/v and gate/up projections for Llama-family layers (default: with graphs).
        # The fused layer is checked against the HF layer once; any mismatch keeps the HF layer.
        self._fused: list[_FusedWeights] | None = None
        if fuse if fuse is not None else self.use_graphs:
            self._fused = self._fuse_layers()
        # Fuse each layer's small elementwise kernels (norms, rotary, residuals) with
        # torch.compile before capture (default: with graphs). Decode at small batch is bound by
        # those launches inside the graph, not by weight reads. Dynamo treats a layer's weights
        # as inputs, so all layers share one compiled graph; the row count and KV capacity are
        # marked dynamic (_dynamic_rows), so a search compiles each body once for every bucket
        # above one row (batch 1 keeps its own, specialised graph).
        self.compiled = bool(self.use_graphs if compile_layers is None else compile_layers)
        self._call_layer, self._fused_layer, self._head_math = _call_layer, _fused_layer, _head_math
        if self.compiled:
            dynamo = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(dynamo, name):
                    setattr(dynamo, name, max(getattr(dynamo, name), 4096))
            self._call_layer = torch.compile(_call_layer)
            self._fused_layer = torch.compile(_fused_layer)
            self._head_math = torch.compile(_head_math)
        # Decode attention that reads only valid KV columns (Triton), with fused layers on CUDA;
        # checked against the plain-PyTorch statement of the same function before use.
        self.triton_attention = False
        if self._fused is not None and runner.device.type == "cuda" and triton_attention is not False:
            self.triton_attention = self._check_triton_attention()
        # Batch 1 (the latency case): projections as one-row Triton kernels with the norm,
        # rotary, KV writes, SiLU·up and residuals fused in (polar.gemv), checked once.
        self.row_gemv = False
        if self.triton_attention and row_gemv is not False:
            self.row_gemv = self._check_row_gemv()
        if self.use_graphs:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=runner.device)
            # A private graph pool is freed when its last graph is, and capturing into a freed
            # pool fails; this small graph keeps it alive while workspaces come and go.
            self._anchor_tensor = torch.zeros(1, device=runner.device)
            self._anchor = torch.cuda.CUDAGraph()
            with torch.cuda.stream(self._stream):
                self._anchor.capture_begin(pool=self._pool)
                self._anchor_tensor.add_(1)
                self._anchor.capture_end()
            torch.cuda.current_stream().wait_stream(self._stream)

    def _fuse_layers(self) -> list[_FusedWeights] | None:
        """Fused projections for every layer, or None where the architecture isn't covered or the
        fused layer disagrees with the HF layer on a random decode input."""
        runner = self.runner
        if getattr(runner.config, "model_type", None) not in FUSABLE_MODEL_TYPES:
            return None
        fused = [fuse_projections(layer) for layer in runner._layers]
        if any(f is None for f in fused):
            return None
        if not self.check_fused_layer(runner, fused[0]):
            return None
        return fused  # type: ignore[return-value]

    @torch.inference_mode()
    def check_fused_layer(self, runner: "ProgramRunner", weights: _FusedWeights, rows: int = 3, tcap: int = 8,
                          one_row: bool = False) -> bool:
        """Layer 0 through :func:`_fused_layer` vs the HF layer (static-KV attention) on random
        inputs: same output within bf16 rounding, and same k/v written."""
        device, dtype = runner.device, runner.dtype
        gen = torch.Generator(device="cpu").manual_seed(0)
        hidden_size = runner._backbone.embed_tokens.weight.shape[1]
        h = torch.randn(rows, 1, hidden_size, generator=gen).to(device, dtype)
        positions = torch.full((rows, 1), tcap - 1, dtype=torch.long, device=device)
        pe = runner._backbone.rotary_emb(h, positions)
        mask = torch.zeros(rows, 1, 1, tcap, device=device, dtype=dtype)
        column = torch.tensor([tcap - 1], device=device)
        shape = (rows, self._kv_heads, tcap, self._head_dim)
        past = torch.randn(2, *shape, generator=gen).to(device, dtype)
        ref_kv, our_kv = past.clone(), past.clone()
        layer = runner._layers[0]
        with self._decode_attention():
            ref = _call_layer(layer, h, mask, positions, pe, {runner._cache_kwarg: _SlotWriter(column, ref_kv[0], ref_kv[1])})
        ours = _fused_layer(layer, *weights.args(), h, mask, pe, column, our_kv[0], our_kv[1], one_row=one_row)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        scale = float(ref.float().abs().max()) + 1e-6
        return bool(
            float((ours - ref).float().abs().max()) <= tol * scale
            and float((our_kv - ref_kv).float().abs().max()) <= tol * (float(ref_kv.float().abs().max()) + 1e-6)
        )

    def _check_row_gemv(self) -> bool:
        """Whether the one-row kernels apply (an RMSNorm with ``variance_epsilon`` before q/k/v, a
        SiLU MLP, the Triton operator) and the one-row layer and head agree with the HF modules."""
        from polar import gemv as gv

        runner = self.runner
        layer, backbone = runner._layers[0], runner._backbone
        norm = layer.input_layernorm
        if gv.operator() is None or getattr(runner.config, "hidden_act", None) != "silu":
            return False
        if not (hasattr(norm, "variance_epsilon") and hasattr(norm, "weight")):
            return False
        try:
            if not self.check_fused_layer(runner, self._fused[0], rows=1, one_row=True):
                return False
            with torch.inference_mode():
                h = torch.randn(1, 1, backbone.embed_tokens.weight.shape[1], device=runner.device).to(runner.dtype)
                parts = backbone.norm, runner.model.lm_head, backbone.embed_tokens, h
                logits, token, _ = _head_math(*parts, one_row=True)
                return bool((token == logits.argmax(-1)).all())
        except Exception as err:  # no usable Triton here: cuBLAS it is
            import sys

            print(f"polar: one-row Triton projections unavailable ({type(err).__name__}); using cuBLAS", file=sys.stderr)
            return False

    @staticmethod
    def supports(runner: "ProgramRunner") -> bool:
        """CUDA device, attention layers with a standard ``self_attn``, no MoE or sliding windows.

        MoE routing picks experts from the data (host-side control flow), which a graph would
        freeze; sliding-window layers would need a second mask per window.
        """
        if runner.device.type != "cuda" or runner._sliding:
            return False
        config = runner.config
        if any(getattr(config, name, 0) for name in ("num_experts", "num_local_experts", "n_routed_experts")):
            return False
        for layer in runner._layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or not hasattr(attn, "config") or hasattr(getattr(layer, "mlp", None), "experts"):
                return False
        return True

    @torch.inference_mode()
    def _check_triton_attention(self) -> bool:
        """Whether the Triton decode attention runs here and agrees with its reference."""
        from polar import decode_attention as da

        config = self.runner.config
        heads = int(config.num_attention_heads)
        if da.operator() is None or not da.supported(self._head_dim, heads, self._kv_heads):
            return False
        device, dtype = self.runner.device, self.runner.dtype
        gen = torch.Generator(device="cpu").manual_seed(0)
        try:
            for rows, tcap in ((1, 384), (5, 128)):
                q = torch.randn(rows, heads, self._head_dim, generator=gen).to(device, dtype)
                kv = torch.randn(2, rows, self._kv_heads, tcap, self._head_dim, generator=gen).to(device, dtype)
                start = torch.randint(0, tcap // 2, (rows,), generator=gen).to(device, torch.int32)
                column = torch.tensor([tcap - 3], device=device)
                ours = torch.ops.polar.decode_attention(q, kv[0], kv[1], start, column, self._head_dim ** -0.5)
                ref = da.decode_attention_reference(q, kv[0], kv[1], start, column, self._head_dim ** -0.5)
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                if float((ours.float() - ref.float()).abs().max()) > tol * (float(ref.float().abs().max()) + 1e-6):
                    return False
        except Exception as err:  # no usable Triton on this device: masked SDPA it is
            import sys

            print(f"polar: Triton decode attention unavailable ({type(err).__name__}); using SDPA", file=sys.stderr)
            return False
        return True

    @property
    def fused(self) -> bool:
        """Whether decode runs the fused-projection layer (else the model's own HF layer)."""
        return self._fused is not None

    # ---- public entry point (called by ProgramRunner._generate_chunk)

    @torch.inference_mode()
    def generate_chunk(
        self, token_lists: list[list[int]], programs: list[list[int]], max_new_tokens: int, stops: set[int]
    ) -> tuple[list[list[int]], list[bool]]:
        """Greedy tokens per row (stop token excluded) and whether a stop token ended each row."""
        self.last_logits = []
        batch = len(token_lists)
        outputs: list[list[int]] = [[] for _ in range(batch)]
        stopped = [False] * batch
        if max_new_tokens <= 0 or batch == 0:
            return outputs, stopped
        width = max(len(t) for t in token_lists)
        tcap = -(-(width + max_new_tokens) // TIME_BLOCK) * TIME_BLOCK
        self._min_bucket = 1 if batch == 1 else 2
        ws = self._workspace(tcap, self._bucket(batch))
        steps = build_schedule(programs, "cpu")
        self._make_room(ws, steps, batch)
        slots: list[_Slot] = []
        try:
            for step in steps:
                slots.append(self._acquire(ws, step.layer, list(step.members), batch))
            self._prefill(ws, token_lists, programs, steps, slots)
            self._decode(ws, slots, batch, max_new_tokens, stops, outputs, stopped)
        finally:
            for slot in slots:
                slot.in_use = False
        return outputs, stopped

    def release_memory(self) -> None:
        """Drop every workspace (buffers and graphs); they are rebuilt when needed."""
        self._workspaces.clear()

    # ---- memory

    def _slot_bytes(self, bucket: int, tcap: int) -> int:
        return bucket * tcap * self.runner.kv_column_bytes

    def _make_room(self, ws: _Workspace, steps: list, batch: int) -> None:
        """Free what only saves time until the slots this batch still has to allocate fit in device
        memory; if they cannot, raise ``torch.OutOfMemoryError`` (the runner then splits the batch)."""
        if self.runner.device.type != "cuda":
            return
        free_in_pool: dict[tuple[int, int, bool], int] = {}
        for key, pool in ws.slots.items():
            free_in_pool[key] = sum(1 for slot in pool if not slot.in_use)
        needed = 0
        for step in steps:
            members = list(step.members)
            key = (step.layer, self._bucket(len(members)), self._is_dense(members, batch))
            if free_in_pool.get(key, 0) > 0:
                free_in_pool[key] -= 1
            else:
                needed += self._slot_bytes(key[1], ws.tcap)
        margin = 2 << 30

        def available() -> int:
            free, _ = torch.cuda.mem_get_info(self.runner.device)
            stats = torch.cuda.memory_stats(self.runner.device)
            return free + stats.get("reserved_bytes.all.current", 0) - stats.get("allocated_bytes.all.current", 0)

        if available() >= needed + margin:
            return
        for tcap in [t for t in self._workspaces if t != ws.tcap]:  # other prompt widths first
            del self._workspaces[tcap]
        ws.drop_idle_slots()
        torch.cuda.empty_cache()
        if available() >= needed + margin:
            return
        cache = self.runner._prompt_cache
        if cache is not None and len(cache):
            cache.clear()
            torch.cuda.empty_cache()
            if available() >= needed + margin:
                return
        raise torch.OutOfMemoryError(f"{needed / 2**30:.1f} GiB of KV slots do not fit for {batch} sequences")

    # ---- slots and workspaces

    def _workspace(self, tcap: int, rows: int) -> _Workspace:
        """The workspace for KV capacity ``tcap`` with room for ``rows`` rows (a larger batch than
        before rebuilds it; the least recently used one goes when there are too many)."""
        ws = self._workspaces.get(tcap)
        if ws is not None and ws.max_rows < rows:
            del self._workspaces[tcap]
            ws = None
        if ws is None:
            while len(self._workspaces) >= self.max_workspaces:
                self._workspaces.popitem(last=False)
            ws = self._workspaces[tcap] = _Workspace(self.runner, rows, tcap)
        self._workspaces.move_to_end(tcap)
        return ws

    def _bucket(self, n: int) -> int:
        """Rows a graph runs for ``n`` rows: a power of two, and at least 2 inside a multi-row
        batch, so a search never compiles the specialised one-row graph (batch 1 is serving)."""
        return max(self._min_bucket, bucket_for(n))

    def _is_dense(self, members: list[int], batch: int) -> bool:
        """Rows ``0..n-1`` filling their bucket, or every row of the batch: the step can slice
        workspace rows instead of gathering (rows past the batch are free to scribble on)."""
        n = len(members)
        return n > 0 and members[-1] == n - 1 and (n == self._bucket(n) or n == batch)

    def _acquire(self, ws: _Workspace, layer: int, members: list[int], batch: int) -> _Slot:
        """A free slot for ``layer`` sized for ``members`` (batch rows), rows vector filled in."""
        bucket = self._bucket(len(members))
        dense = self._is_dense(members, batch)
        pool = ws.slots.setdefault((layer, bucket, dense), [])
        slot = next((s for s in pool if not s.in_use), None)
        if slot is None:
            device, dtype = self.runner.device, self.runner.dtype
            shape = (bucket, self._kv_heads, ws.tcap, self._head_dim)
            # zeros, not empty: masked columns must hold finite values (0 * NaN would leak)
            slot = _Slot(
                layer, bucket, dense, torch.full((bucket,), ws.scratch, dtype=torch.long, device=device),
                torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
            )
            pool.append(slot)
            self.slots_created += 1
        slot.in_use = True
        self._set_members(ws, slot, members)
        return slot

    def _set_members(self, ws: _Workspace, slot: _Slot | _Head, members: list[int]) -> None:
        slot.members = list(members) + [-1] * (slot.bucket - len(members))
        rows = [m if m >= 0 else ws.scratch for m in slot.members]
        host = torch.tensor(rows, dtype=torch.long)
        if slot.rows.is_cuda:
            host = host.pin_memory()
        slot.rows.copy_(host, non_blocking=True)

    # ---- prefill

    def _prefill(
        self, ws: _Workspace, token_lists: list[list[int]], programs: list[list[int]], steps: list,
        slots: list[_Slot],
    ) -> None:
        """Prefill (see :mod:`polar.prefill`) writing KV into the slots; set up the workspace so
        that the next head step reads each row's last prompt token state."""
        runner = self.runner
        batch = len(token_lists)
        width = max(len(t) for t in token_lists)
        # the steps stay on the host: prefill reads only their members and positions
        last = prefill(runner, token_lists, programs, steps, _SlotSink(slots), cache=runner.prompt_cache)
        lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
        valid = torch.arange(width)[None, :] >= width - lengths[:, None]
        if runner.device.type == "cuda":
            lengths, valid = lengths.pin_memory(), valid.pin_memory()
        lengths = lengths.to(runner.device, non_blocking=True)
        valid = valid.to(runner.device, non_blocking=True)
        neg = torch.finfo(runner.dtype).min
        ws.hidden.zero_()
        ws.hidden[:batch].copy_(last)
        ws.mask.zero_()  # unused and scratch rows attend everywhere: finite garbage, never NaN
        ws.mask[:batch, 0, 0, :].fill_(neg)
        ws.mask[:batch, 0, 0, :width].masked_fill_(valid, 0.0)
        ws.positions.zero_()
        ws.positions[:batch, 0].copy_(lengths - 1)
        ws.start.fill_(ws.tcap)
        ws.start[:batch].copy_(width - lengths)
        ws.column.fill_(width - 1)

    # ---- decode

    def _decode(
        self, ws: _Workspace, slots: list[_Slot], batch: int, max_new_tokens: int,
        stops: set[int], outputs: list[list[int]], stopped: list[bool],
    ) -> None:
        live = list(range(batch))
        active = list(slots)
        cuda = self.runner.device.type == "cuda"
        host = torch.empty(max_new_tokens, self._bucket(batch), dtype=torch.long, pin_memory=cuda)
        with self._decode_attention():
            head = self._head(ws, live, batch)
            for t in range(max_new_tokens):
                last_token = t == max_new_tokens - 1
                self._run(ws, head, self._head_step)
                members = head.members
                host[t, : len(members)].copy_(head.tokens[: len(members)], non_blocking=True)
                copied = torch.cuda.Event() if cuda else None
                if copied is not None:
                    copied.record()
                if not last_token:
                    # Stop tokens are checked one token behind: the next token's layers are
                    # queued before the host reads this token, so the GPU never waits for the
                    # host. A row that just stopped runs one wasted token; its output is dropped.
                    self._run_steps(ws, active)
                if copied is not None:
                    copied.synchronize()
                tokens = host[t, : len(members)].tolist()
                live_set = set(live)
                if self.capture_logits:
                    rows = [k for k, m in enumerate(members) if m in live_set]
                    step_logits = torch.full((batch, head.logits.shape[1]), float("nan"))
                    step_logits[[members[k] for k in rows]] = head.logits[rows].float().cpu()
                    self.last_logits.append(step_logits)
                finished = set()
                for row, token in zip(members, tokens):
                    if row < 0 or row not in live_set:
                        continue
                    if token in stops:
                        stopped[row] = True
                        finished.add(row)
                    else:
                        outputs[row].append(token)
                if last_token or len(finished) == len(live):
                    return
                if finished:
                    live = [r for r in live if r not in finished]
                    active = self._drop_rows(ws, slots, set(live))
                    if self._bucket(len(live)) < head.bucket:
                        head = self._head(ws, live, batch)

    def _drop_rows(self, ws: _Workspace, slots: list[_Slot], live: set[int]) -> list[_Slot]:
        """Early exit: a step whose live rows fit half its bucket moves their KV into a smaller
        slot; otherwise finished rows keep running (their tokens are ignored), so graphs stay valid
        and a batch is reorganised at most log2(rows) times. ``slots`` is updated in place;
        returns the slots still to run."""
        active = []
        for s, slot in enumerate(slots):
            keep = [j for j, m in enumerate(slot.members) if m in live]  # padding (-1) is never live
            if not keep:
                continue  # slot stays reserved (its index must remain valid) but never runs
            if self._bucket(len(keep)) == slot.bucket:
                active.append(slot)
                continue
            members = [slot.members[j] for j in keep]
            new = self._acquire(ws, slot.layer, members, batch=-1)
            index = torch.tensor(keep, dtype=torch.long, device=slot.keys.device)
            new.keys[: len(keep)].copy_(slot.keys.index_select(0, index))
            new.values[: len(keep)].copy_(slot.values.index_select(0, index))
            slot.in_use = False
            slots[s] = new
            active.append(new)
            self.compactions += 1
        return active

    def _head(self, ws: _Workspace, live: list[int], batch: int) -> _Head:
        bucket = self._bucket(len(live))
        dense = self._is_dense(live, batch)
        head = ws.heads.get((bucket, dense))
        if head is None:
            device = self.runner.device
            vocab = self.runner.model.lm_head.weight.shape[0]
            head = _Head(
                bucket, dense, torch.full((bucket,), ws.scratch, dtype=torch.long, device=device),
                torch.zeros(bucket, dtype=torch.long, device=device),
                torch.zeros(bucket, vocab, dtype=self.runner.dtype, device=device),
            )
            ws.heads[(bucket, dense)] = head
        self._set_members(ws, head, live)
        return head

    # ---- the two kinds of graph bodies

    def _layer_step(self, ws: _Workspace, slot: _Slot) -> None:
        """Run ``slot.layer`` on the slot's rows at the current column (graph body)."""
        runner = self.runner

        def take(t: torch.Tensor) -> torch.Tensor:  # the slot's rows of a workspace tensor
            return t[: slot.bucket] if slot.dense else t.index_select(0, slot.rows)

        h, pe = take(ws.hidden), (take(ws.cos), take(ws.sin))
        layer = runner._layers[slot.layer]
        if self._fused is not None:
            # only what the layer reads: first valid columns for the Triton kernel, else the mask
            start = take(ws.start) if self.triton_attention else None
            mask = None if self.triton_attention else take(ws.mask)
            if self.compiled:
                _dynamic_rows(h, pe[0], pe[1], slot.keys, slot.values, start if mask is None else mask)
            out = self._fused_layer(layer, *self._fused[slot.layer].args(), h, mask, pe, ws.column, slot.keys,
                                    slot.values, start, self.row_gemv and slot.bucket == 1)
        else:
            cache = _SlotWriter(ws.column, slot.keys, slot.values)
            out = self._call_layer(layer, h, take(ws.mask), take(ws.positions), pe, {runner._cache_kwarg: cache})
        if slot.dense:
            ws.hidden[: slot.bucket].copy_(out)
        else:
            ws.hidden.index_copy_(0, slot.rows, out)

    def _head_step(self, ws: _Workspace, head: _Head) -> None:
        """Next token of each row, its embedding as the next input, and advance one column."""
        runner = self.runner
        backbone = runner._backbone
        h = ws.hidden[: head.bucket] if head.dense else ws.hidden.index_select(0, head.rows)
        if self.compiled:
            _dynamic_rows(h)
        logits, tokens, embedded = self._head_math(backbone.norm, runner.model.lm_head, backbone.embed_tokens, h,
                                                   self.row_gemv and head.bucket == 1)
        head.logits.copy_(logits)
        head.tokens.copy_(tokens)
        if head.dense:
            ws.hidden[: head.bucket].copy_(embedded)
        else:
            ws.hidden.index_copy_(0, head.rows, embedded)
        ws.column.add_(1)
        ws.mask.index_fill_(3, ws.column, 0.0)
        ws.positions.add_(1)
        cos, sin = backbone.rotary_emb(ws.hidden, ws.positions)
        ws.cos.copy_(cos)
        ws.sin.copy_(sin)

    # ---- execution: eager, or captured once and replayed

    def _run(self, ws: _Workspace, unit: _Slot | _Head, body: Callable[[_Workspace, Any], None]) -> None:
        if not self.use_graphs:
            body(ws, unit)
            return
        if unit.graph is None:
            unit.graph = self._capture(ws, lambda: body(ws, unit), [self._signature(ws, unit)])
        unit.graph.replay()

    def _run_steps(self, ws: _Workspace, active: list[_Slot]) -> None:
        """Every active step of one decode token. Small batches replay them as ONE graph (captured
        per set of slots, so a repeated program, e.g. in serving, reuses it): their time is
        launch-bound. Larger batches replay one graph per step; those launches hide behind the
        device work, and a new batch of programs needs no new capture."""
        if not (self.use_graphs and self.token_graphs and active
                and all(slot.bucket <= self.token_graph_rows for slot in active)):
            for slot in active:
                self._run(ws, slot, self._layer_step)
            return
        key = tuple(id(slot) for slot in active)
        graph = ws.token_graphs.get(key)
        if graph is None:
            def body() -> None:
                for slot in active:
                    self._layer_step(ws, slot)

            graph = ws.token_graphs[key] = self._capture(ws, body, [self._signature(ws, slot) for slot in active])
            while len(ws.token_graphs) > 64:
                ws.token_graphs.popitem(last=False)
        ws.token_graphs.move_to_end(key)
        graph.replay()

    @staticmethod
    def _signature(ws: _Workspace, unit: _Slot | _Head) -> tuple:
        """What a body's compiled code and kernels depend on (not the layer: layers share them)."""
        return (type(unit).__name__, unit.bucket, unit.dense, ws.tcap, ws.max_rows)

    def _capture(self, ws: _Workspace, fn: Callable[[], None], signatures: list[tuple]) -> Any:
        """Record ``fn`` into a graph sharing one memory pool: every graph writes its results into
        static buffers, so their intermediates never overlap. The first time a shape is seen,
        ``fn`` first runs once on a side stream (compiles, first-use allocations, library
        handles), and its effect on the workspace is undone."""
        import time

        began = time.perf_counter()
        stream = self._stream
        if not all(sig in self._warm for sig in signatures):
            saved = [t.clone() for t in ws.state()]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            for t, s in zip(ws.state(), saved):
                t.copy_(s)
            self._warm.update(signatures)
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=self._pool)
            try:
                fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        self.graphs_captured += 1
        self.capture_seconds += time.perf_counter() - began
        return graph

    @contextmanager
    def _decode_attention(self) -> Iterator[None]:
        """Route the layers' attention to :func:`_static_kv_attention` while decoding (graphs
        record the kernels, so replays keep it after the setting is restored)."""
        saved = [c._attn_implementation for c in self._attn_configs]
        for c in self._attn_configs:
            c._attn_implementation = ATTENTION_NAME
        try:
            yield
        finally:
            for c, value in zip(self._attn_configs, saved):
                c._attn_implementation = value
