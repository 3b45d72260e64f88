"""The program-execution engine: one batch, many different programs, unrolled semantics.

Running program ``P = [l_1 .. l_n]`` means embed, ``layer[l_1]`` ... ``layer[l_n]``, final norm,
LM head, and it must equal a physically unrolled model whose k-th layer is a copy of
``layer[l_k]``. So every *program position* owns its KV state; a repeated layer writes a second,
separate cache entry (the authors' release shares one slot between the two passes, which makes
results depend on the attention backend and on whether a cache is used).

:class:`ProgramRunner` is the public face. A ``generate`` call

1. splits the rows into *chunks* of similar prompt length (:func:`polar.schedule.plan_groups`), so
   that one long prompt does not make every row pay for its width in attention and padding;
2. hands each chunk to a *backend*: :class:`EagerBackend` (any device, any architecture) or, on
   CUDA, :class:`polar.cuda_engine.CudaGraphDecoder` (static KV slots and CUDA graphs). Both merge
   the chunk's programs into one schedule of shared layer steps (:mod:`polar.schedule`), prefill
   through :mod:`polar.prefill` (length groups, full-depth prefixes from the runner's
   :class:`polar.prompt_cache.PromptCache`) and decode greedily with per-row early exit; both give
   the same tokens.

The engine calls the model's own decoder-layer modules (attention, MLP, MoE, norms) and only
replaces the loop around them and the cache object they write into, so one code path serves Llama,
Qwen2, Qwen2-MoE, Qwen3, Mistral and other HF decoder-only models with a ``layers`` list.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from polar.errors import UnsupportedModelError
from polar.prefill import NullSink, prefill
from polar.programs import full_program, validate_program
from polar.prompt_cache import PromptCache
from polar.schedule import Step, build_schedule, plan_groups, rows_on_device

Prompt = str | Sequence[int]

#: Architectures whose equivalence with HF's own forward is covered by the test suite.
TESTED_MODEL_TYPES = {"llama", "qwen2", "qwen2_moe", "qwen3", "mistral"}

#: Prompt strings whose token ids a runner remembers.
ENCODE_CACHE_SIZE = 16384

#: Chunks of a ``generate`` call are planned on prompt lengths rounded up to this many tokens.
CHUNK_UNIT = 64


@dataclass
class Generation:
    """One sequence's greedy continuation."""

    token_ids: list[int]  # new tokens only, stop token excluded
    text: str
    layers_executed: int  # program length: layers run per token
    stopped: bool = False  # True when a stop token ended it (False: max_new_tokens reached)
    program: list[int] = field(default_factory=list)


class Backend(Protocol):
    """What runs one chunk of rows: greedy tokens per row (stop token excluded) and whether a stop
    token ended each row."""

    def generate_chunk(
        self, token_lists: list[list[int]], programs: list[list[int]], max_new_tokens: int, stops: set[int]
    ) -> tuple[list[list[int]], list[bool]]: ...


# --------------------------------------------------------------------------- cache


class StepCache:
    """KV storage indexed by schedule step, preallocated to ``capacity`` tokens.

    HF attention modules call ``cache.update(k, v, layer_idx, ...)`` with their *model* layer
    index; we ignore it and write into the slot of the step being run (``self.current``), which
    is what gives every program position its own state. Prefill writes through :meth:`store`.
    """

    def __init__(self, steps: list[Step], capacity: int):
        self.rows = [len(s.members) for s in steps]
        self.keys: list[torch.Tensor | None] = [None] * len(steps)
        self.values: list[torch.Tensor | None] = [None] * len(steps)
        self.capacity = capacity
        self.length = 0  # tokens already stored (same for every row: rows advance together)
        self.current = 0

    def _buffers(self, step: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[step] is None:
            # zeros: columns left of a shorter prompt are masked, but must hold finite values
            shape = (self.rows[step], like.shape[1], self.capacity, like.shape[-1])
            self.keys[step] = like.new_zeros(shape)
            self.values[step] = like.new_zeros(shape)
        return self.keys[step], self.values[step]  # type: ignore[return-value]

    def store(self, step: int, members: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offset: int) -> None:
        k_buf, v_buf = self._buffers(step, key)
        end = offset + key.shape[-2]
        k_buf[members, :, offset:end] = key
        v_buf[members, :, offset:end] = value

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int = 0, *args: Any, **kwargs: Any):
        step, start = self.current, self.length
        end = start + key.shape[-2]
        k_buf, v_buf = self._buffers(step, key)
        k_buf[..., start:end, :] = key
        v_buf[..., start:end, :] = value
        return k_buf[..., :end, :], v_buf[..., :end, :]

    def keep_rows(self, steps: list[Step], keep: torch.Tensor) -> list[Step]:
        """Drop finished rows (``keep`` is a bool mask over the batch); return the new schedule."""
        keep_host = keep.tolist()
        new_index, kept = [], 0
        for flag in keep_host:
            new_index.append(kept if flag else -1)
            kept += bool(flag)
        new_steps = []
        for s, step in enumerate(steps):
            mask = [keep_host[r] for r in step.members]
            if self.keys[s] is not None and not all(mask):
                index = torch.tensor([j for j, m in enumerate(mask) if m], dtype=torch.long, device=self.keys[s].device)
                self.keys[s] = self.keys[s].index_select(0, index)
                self.values[s] = self.values[s].index_select(0, index)
            members = tuple(new_index[r] for r in step.members if keep_host[r])
            positions = tuple(p for r, p in zip(step.members, step.positions) if keep_host[r])
            new_steps.append(Step(step.layer, step.rows, len(members) == kept, members, positions))
            self.rows[s] = len(members)  # buffers not yet allocated get the new row count
        return rows_on_device(new_steps, steps[0].rows.device) if steps else new_steps

    # Methods some HF code paths probe on cache objects.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


# --------------------------------------------------------------------------- runner


class ProgramRunner:
    """Run a HF decoder-only LM under arbitrary per-row programs of its layers.

    ``logits`` (no cache) and ``generate`` (greedy, KV cache) take one program per row; rows may
    all differ. The model is used as loaded; the runner keeps no per-request state on it, only
    caches that never change results (the prompt cache, the CUDA decoder's compiled graphs).

    Speed features, each of which can be switched off (results stay the same):
    ``use_prompt_cache`` (full-depth prompt states reused across calls; ``prompt_cache_bytes``
    bounds its memory), ``length_chunks`` (rows grouped by prompt length instead of input order)
    and, on CUDA, the fast path (:meth:`enable_fast_path`; ``runner.fast_path = None`` disables it).
    """

    def __init__(
        self, model: Any, tokenizer: Any = None, source: str | None = None, max_batch_size: int = 64,
        prompt_cache_bytes: int | None = None,
    ):
        backbone = getattr(model, "model", None)
        layers = getattr(backbone, "layers", None)
        missing = [n for n in ("embed_tokens", "norm", "rotary_emb") if not hasattr(backbone, n)]
        if not isinstance(layers, torch.nn.ModuleList) or missing or not hasattr(model, "lm_head"):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a decoder-only LM with a list of decoder layers "
                "(expected model.model.layers, embed_tokens, norm, rotary_emb and lm_head)"
            )
        if getattr(model.config, "is_encoder_decoder", False):
            raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model")
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.source = source or getattr(model.config, "_name_or_path", type(model).__name__)
        self.max_batch_size = max_batch_size
        self._backbone = backbone
        self._layers = layers
        params = inspect.signature(layers[0].forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._sliding = self._sliding_layers()
        self._stop_ids = self._find_stop_ids()
        self._encoded: OrderedDict[str, list[int]] = OrderedDict()
        self.backend: Backend = EagerBackend(self)
        self.use_prompt_cache = True
        self.prompt_cache_bytes = prompt_cache_bytes
        self._prompt_cache: PromptCache | None = None
        self.length_chunks = True
        # Prefill grouping (see polar.prefill): the fixed cost of one more length group, in
        # row-tokens of compute (None: by device), and the most rows*tokens one group may hold
        # (activation memory).
        self.prefill_group_tokens: float | None = None
        self.prefill_max_tokens = 1 << 18
        self._row_cap: int | None = None  # rows per chunk that fit in memory, once learned
        if getattr(self.config, "model_type", None) not in TESTED_MODEL_TYPES:
            self.check_against_hf()  # an untested architecture must prove itself before use

    # ---- construction

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> "ProgramRunner":
        """Load a hub id, local directory or ``.gguf`` file (see :mod:`polar.loading`)."""
        from polar.loading import load_causal_lm

        loaded = load_causal_lm(name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        runner = cls(loaded.model, loaded.tokenizer, source=loaded.source)
        if runner.device.type == "cuda":
            runner.enable_fast_path()
        return runner

    def enable_fast_path(self, **options: Any) -> bool:
        """Use the CUDA-graph decoder when the device and architecture allow it."""
        try:
            from polar.cuda_engine import CudaGraphDecoder
        except ImportError:
            return False
        if not CudaGraphDecoder.supports(self):
            return False
        self.backend = CudaGraphDecoder(self, **options)
        return True

    @property
    def fast_path(self) -> Any:
        """The CUDA decoder when it is the backend, else None; assign None to use the eager path."""
        return None if isinstance(self.backend, EagerBackend) else self.backend

    @fast_path.setter
    def fast_path(self, decoder: Any) -> None:
        self.backend = EagerBackend(self) if decoder is None else decoder

    @property
    def prompt_cache(self) -> PromptCache | None:
        """The cache of full-depth prompt states (created on first use), or None when disabled."""
        if not self.use_prompt_cache:
            return None
        if self._prompt_cache is None:
            kv_heads, head_dim = self.kv_shape
            budget = self.prompt_cache_bytes if self.prompt_cache_bytes is not None else self._default_cache_bytes()
            self._prompt_cache = PromptCache(
                self.num_layers, kv_heads, head_dim, self._backbone.embed_tokens.weight.shape[1],
                self.dtype, self.device, budget,
            )
        return self._prompt_cache

    def _default_cache_bytes(self) -> int:
        """35% of the device memory free now (CUDA), else 1 GiB: the rest is left for KV slots
        and activations of batches of a thousand sequences."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.35)
        return 1 << 30

    def release_memory(self) -> None:
        """Drop every cache that only saves time (prompt states, idle decoder buffers)."""
        if self._prompt_cache is not None:
            self._prompt_cache.clear()
        release = getattr(self.backend, "release_memory", None)
        if release is not None:
            release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return self._backbone.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._backbone.embed_tokens.weight.dtype

    @property
    def model_name(self) -> str:
        return self.source

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(KV heads, head size) of the attention layers: what one KV column holds per layer."""
        config, attn = self.config, self._layers[0].self_attn
        kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = int(getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        return kv_heads, head_dim

    @property
    def kv_column_bytes(self) -> int:
        """Bytes of one token's keys and values in one layer."""
        kv_heads, head_dim = self.kv_shape
        return 2 * kv_heads * head_dim * torch.empty((), dtype=self.dtype).element_size()

    def _sliding_layers(self) -> dict[int, int]:
        """Layers that attend within a window (e.g. Gemma/Qwen2 hybrids), by config."""
        window = getattr(self.config, "sliding_window", None)
        types = getattr(self.config, "layer_types", None)
        if not window or not types:
            return {}
        return {i: int(window) for i, t in enumerate(types) if t == "sliding_attention"}

    def _find_stop_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, getattr(self.config, "eos_token_id", None),
                      getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        if self.tokenizer is not None:
            vocab = self.tokenizer.get_vocab()
            for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>"):
                if token in vocab:
                    ids.add(vocab[token])
        return ids

    @property
    def stop_token_ids(self) -> set[int]:
        """Tokens that end a sequence: the tokenizer's EOS and the chat end-of-turn tokens."""
        return set(self._stop_ids)

    # ---- inputs

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids per prompt; strings are tokenised (BOS added unless the text already has it).
        Recent strings are remembered: search sends the same prompts every round."""
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer; pass token ids or a tokenizer")
                ids = self._encoded.get(prompt)
                if ids is None:
                    bos = getattr(self.tokenizer, "bos_token", None)
                    add_special = not (bos and prompt.startswith(bos))
                    ids = self._encoded[prompt] = list(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
                    while len(self._encoded) > ENCODE_CACHE_SIZE:
                        self._encoded.popitem(last=False)
                else:
                    self._encoded.move_to_end(prompt)
                out.append(list(ids))
            else:
                out.append([int(t) for t in prompt])
            if not out[-1]:
                raise ValueError(f"prompt {len(out) - 1} is empty")
        return out

    def _check_programs(self, programs: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
        if len(programs) != batch:
            raise ValueError(f"got {len(programs)} programs for {batch} prompts; pass one program per prompt")
        checked = []
        for i, program in enumerate(programs):
            try:
                checked.append(validate_program(program, self.num_layers))
            except ValueError as err:
                raise ValueError(f"program {i}: {err}") from None
        return checked

    def _pad_left(self, token_lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(t) for t in token_lists)
        ids = torch.zeros((len(token_lists), width), dtype=torch.long)
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for r, toks in enumerate(token_lists):
            ids[r, width - len(toks):] = torch.tensor(toks, dtype=torch.long)
            mask[r, width - len(toks):] = 1
        both = torch.stack([ids, mask])
        if self.device.type == "cuda":
            both = both.pin_memory()
        both = both.to(self.device, non_blocking=True)
        return both[0], both[1]

    # ---- core forward

    def _attention_masks(self, key_valid: torch.Tensor, query_len: int) -> dict[int | None, torch.Tensor]:
        """Additive masks ``[B, 1, q, k]``: causal, no padded keys, and each query sees itself
        (so padded query rows stay finite). One extra mask per distinct sliding window."""
        total = key_valid.shape[1]
        q_pos = torch.arange(total - query_len, total, device=key_valid.device)[:, None]
        k_pos = torch.arange(total, device=key_valid.device)[None, :]
        causal = k_pos <= q_pos
        allowed = causal[None] & key_valid[:, None, :].bool()
        allowed |= (k_pos == q_pos)[None]
        neg = torch.finfo(self.dtype).min
        masks: dict[int | None, torch.Tensor] = {}
        for window in {None, *self._sliding.values()}:
            a = allowed if window is None else allowed & (k_pos > q_pos - window)[None]
            masks[window] = torch.zeros(a.shape, dtype=self.dtype, device=a.device).masked_fill(~a, neg)[:, None]
        return masks

    def _run_layers(
        self, hidden: torch.Tensor, steps: list[Step], masks: dict[int | None, torch.Tensor],
        position_ids: torch.Tensor, cache: StepCache,
    ) -> torch.Tensor:
        """One decode step of the schedule over ``hidden`` ``[B, 1, H]`` (generic path)."""
        cos, sin = self._backbone.rotary_emb(hidden, position_ids)
        for s, step in enumerate(steps):
            if not step.members:
                continue
            mask = masks[self._sliding.get(step.layer)]
            if step.all_rows:
                h, m, pe, pos = hidden, mask, (cos, sin), position_ids
            else:
                rows = step.rows
                h, m, pe, pos = hidden[rows], mask[rows], (cos[rows], sin[rows]), position_ids[rows]
            cache.current = s
            out = self._layers[step.layer](
                h, attention_mask=m, position_ids=pos, position_embeddings=pe,
                **{self._cache_kwarg: cache}, use_cache=True,
            )
            out = out[0] if isinstance(out, tuple) else out
            hidden = out if step.all_rows else hidden.index_copy(0, step.rows, out)
        return hidden

    def _positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    # ---- public API

    @torch.inference_mode()
    def logits(
        self,
        input_ids: torch.Tensor,
        programs: Sequence[Sequence[int]],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` of each row under its own program, without a KV cache.

        Left padding is expected when ``attention_mask`` is given; padded positions are garbage.
        """
        batch, total = input_ids.shape
        programs = self._check_programs(programs, batch)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
        token_lists = []
        for r in range(batch):
            n = int(mask[r].sum())
            if n == 0 or not bool(mask[r, total - n:].all()):
                raise ValueError(f"row {r}: attention_mask must mark a non-empty, left-padded prompt")
            token_lists.append(ids[r, total - n:].tolist())
        steps = build_schedule(programs, "cpu")  # prefill reads members and positions only
        hidden = prefill(self, token_lists, programs, steps, NullSink(), keep_all=True)
        if hidden.shape[1] < total:
            hidden = torch.cat([hidden.new_zeros(batch, total - hidden.shape[1], hidden.shape[2]), hidden], 1)
        return self.model.lm_head(self._backbone.norm(hidden)).float()

    @torch.inference_mode()
    def token_states(self, prompts: Sequence[Prompt], layer: int) -> list[torch.Tensor]:
        """Hidden states after the first ``layer`` layers of the full-depth model, per prompt
        (``[T_i, hidden]``, no padding). ``layer = 0`` gives the token embeddings."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 0..{self.num_layers}, got {layer}")
        tokens = self.encode(prompts)
        out: list[torch.Tensor] = []
        for start in range(0, len(tokens), self.max_batch_size):
            chunk = tokens[start:start + self.max_batch_size]
            if layer == 0:
                for toks in chunk:
                    ids = torch.tensor(toks, device=self.device)
                    out.append(self._backbone.embed_tokens(ids).float().cpu())
                continue
            programs = [list(range(layer))] * len(chunk)
            steps = build_schedule(programs, "cpu")  # prefill reads members and positions only
            hidden = prefill(self, chunk, programs, steps, NullSink(), keep_all=True)
            for r, toks in enumerate(chunk):
                out.append(hidden[r, hidden.shape[1] - len(toks):].float().cpu())
        return out

    def generate(
        self,
        prompts: Sequence[Prompt],
        programs: Sequence[Sequence[int]] | None = None,
        max_new_tokens: int = 50,
        batch_size: int | None = None,
        stop_token_ids: set[int] | None = None,
    ) -> list[Generation]:
        """Greedy continuation of each prompt under its program (default: full depth).

        Rows run in chunks of at most ``batch_size`` (default ``max_batch_size``), grouped by
        prompt length (:meth:`plan_chunks`); inside a chunk all programs run in one heterogeneous
        batch. Sequences stop at a stop token (``stop_token_ids``, default :attr:`stop_token_ids`;
        an empty set never stops early). A chunk that does not fit in device memory is split.
        """
        stops = self._stop_ids if stop_token_ids is None else set(stop_token_ids)
        token_lists = self.encode(prompts)
        if programs is None:
            programs = [full_program(self.num_layers)] * len(token_lists)
        programs = self._check_programs(programs, len(token_lists))
        size = batch_size or self.max_batch_size
        results: list[Generation | None] = [None] * len(token_lists)
        for chunk in self.plan_chunks([len(t) for t in token_lists], max_new_tokens, size):
            new_tokens, stopped = self._run_chunk(
                [token_lists[i] for i in chunk], [programs[i] for i in chunk], max_new_tokens, stops
            )
            for i, toks, stop in zip(chunk, new_tokens, stopped):
                text = self.tokenizer.decode(toks, skip_special_tokens=True) if self.tokenizer is not None else ""
                results[i] = Generation(toks, text, len(programs[i]), stop, list(programs[i]))
        return results  # type: ignore[return-value]

    def plan_chunks(self, lengths: Sequence[int], max_new_tokens: int, size: int) -> list[list[int]]:
        """Row indices of each chunk a ``generate`` call runs.

        With ``length_chunks`` (default), rows are grouped by prompt length to minimise the
        decode cost model of :meth:`_chunk_costs` (attention reads padded columns; every chunk
        pays one more pass over the layers' weights per token); otherwise input order."""
        size = max(1, min(size, self._row_cap or size))
        if not self.length_chunks:
            return [list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)]
        cell, fixed = self._chunk_costs()
        groups = plan_groups(lengths, CHUNK_UNIT, cell, fixed, extra=max_new_tokens, max_rows=size)
        return [sorted(g) for g in groups]

    def suggest_batch_size(self, prompt_lengths: Sequence[int], max_new_tokens: int, cap: int = 1024) -> int:
        """Rows per engine batch that fit in the device memory free now (a power of two).

        Per row: its KV slots (about 1.25 x D program positions over the prompt and the new
        tokens, the schedule's padding included) and its question's entry in the prompt cache;
        60% of the free memory after a 2 GiB margin goes to rows. On the CPU: 64."""
        if self.device.type != "cuda":
            return min(64, cap)
        lengths = sorted(prompt_lengths) or [256]
        typical = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
        size = torch.empty((), dtype=self.dtype).element_size()
        column = self.kv_column_bytes
        hidden = self._backbone.embed_tokens.weight.shape[1] * size
        slots = 1.25 * self.num_layers * (typical + max_new_tokens) * column
        cached = typical * (self.num_layers * column + (self.num_layers + 1) * hidden) if self.use_prompt_cache else 0
        free, _ = torch.cuda.mem_get_info(self.device)
        rows = int(max(0, free - (2 << 30)) * 0.6 // (slots + cached))
        return max(1, min(cap, 1 << max(0, rows.bit_length() - 1)))

    def _chunk_costs(self) -> tuple[float, float]:
        """Decode cost per token, in bytes: (one row's KV column over all layers, one chunk's
        pass over the weights of ~2D schedule steps plus their launches on CUDA)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        column = self.num_layers * self.kv_column_bytes
        layer = sum(p.numel() for p in self._layers[0].parameters()) * size
        launch = 256 * 2**20 if self.device.type == "cuda" else 0
        return float(column), float(2 * self.num_layers * (layer + launch))

    def _run_chunk(
        self, token_lists: list[list[int]], programs: list[list[int]], max_new_tokens: int, stops: set[int]
    ) -> tuple[list[list[int]], list[bool]]:
        """One chunk through the backend; a chunk that runs out of device memory is halved (and
        later chunks are planned at the size that fitted)."""
        try:
            return self._generate_chunk(token_lists, programs, max_new_tokens, stops)
        except torch.OutOfMemoryError:
            if len(token_lists) == 1:
                raise
        self.release_memory()
        half = len(token_lists) // 2
        if self._row_cap is None or half < self._row_cap:
            import sys

            print(f"polar: {len(token_lists)} sequences did not fit in device memory; running "
                  f"at most {half} at a time", file=sys.stderr)
            self._row_cap = half
        first = self._run_chunk(token_lists[:half], programs[:half], max_new_tokens, stops)
        second = self._run_chunk(token_lists[half:], programs[half:], max_new_tokens, stops)
        return first[0] + second[0], first[1] + second[1]

    def _generate_chunk(
        self, token_lists: list[list[int]], programs: list[list[int]], max_new_tokens: int, stops: set[int]
    ) -> tuple[list[list[int]], list[bool]]:
        return self.backend.generate_chunk(token_lists, programs, max_new_tokens, stops)

    # ---- self-check

    @torch.inference_mode()
    def check_against_hf(self, seq_len: int = 8, atol: float | None = None) -> float:
        """Max |difference| between our full-depth logits and the HF model's own forward on
        random tokens; raise :class:`UnsupportedModelError` if they disagree."""
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(self.config.vocab_size), (1, seq_len), generator=gen).to(self.device)
        ours = self.logits(ids, [full_program(self.num_layers)])
        theirs = self.model(input_ids=ids).logits.float()
        diff = float((ours - theirs).abs().max())
        limit = atol if atol is not None else (1e-3 if self.dtype == torch.float32 else 5e-2) * float(theirs.abs().max())
        if not diff <= limit:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: full-depth program differs from the HF forward "
                f"(max diff {diff:.3g}); this architecture needs support in polar.engine"
            )
        return diff



# --------------------------------------------------------------------------- generic backend


class EagerBackend:
    """The generic path: the model's HF layers run eagerly over the schedule, KV in a
    :class:`StepCache`. Works on any device and for every supported architecture."""

    def __init__(self, runner: ProgramRunner):
        self.runner = runner

    @torch.inference_mode()
    def generate_chunk(
        self, token_lists: list[list[int]], programs: list[list[int]], max_new_tokens: int, stops: set[int]
    ) -> tuple[list[list[int]], list[bool]]:
        runner = self.runner
        batch = len(token_lists)
        outputs: list[list[int]] = [[] for _ in range(batch)]
        stopped = [False] * batch
        if max_new_tokens <= 0 or batch == 0:
            return outputs, stopped
        device = runner.device
        width = max(len(t) for t in token_lists)
        steps = build_schedule(programs, device)
        cache = StepCache(steps, width + max_new_tokens)
        hidden = prefill(runner, token_lists, programs, steps, cache, cache=runner.prompt_cache)
        cache.length = width
        lengths = torch.tensor([len(t) for t in token_lists], device=device)
        key_valid = (torch.arange(width, device=device)[None, :] >= width - lengths[:, None]).long()
        last_pos = (lengths - 1)[:, None]
        origin = torch.arange(batch, device=device)  # batch row -> original index
        stop_ids = torch.tensor(sorted(stops) or [-1], device=device)
        for t in range(max_new_tokens):
            logits = runner.model.lm_head(runner._backbone.norm(hidden[:, -1:]))[:, -1]
            next_tokens = logits.argmax(-1)
            done = torch.isin(next_tokens, stop_ids)
            for orig, tok, fin in zip(origin.tolist(), next_tokens.tolist(), done.tolist()):
                if fin:
                    stopped[orig] = True
                else:
                    outputs[orig].append(tok)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):
                keep = ~done
                steps = cache.keep_rows(steps, keep)
                origin, next_tokens = origin[keep], next_tokens[keep]
                key_valid, last_pos = key_valid[keep], last_pos[keep]
            key_valid = torch.cat([key_valid, torch.ones_like(key_valid[:, :1])], dim=1)
            last_pos = last_pos + 1
            hidden = runner._backbone.embed_tokens(next_tokens[:, None])
            masks = runner._attention_masks(key_valid, 1)
            hidden = runner._run_layers(hidden, steps, masks, last_pos, cache)
            cache.length += 1
        return outputs, stopped
