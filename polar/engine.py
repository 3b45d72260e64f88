"""The program-execution engine: one batch, many different programs, unrolled semantics.

Running program ``P = [l_1 .. l_n]`` means embed, ``layer[l_1]`` ... ``layer[l_n]``, final norm,
LM head, and it must equal a physically unrolled model whose k-th layer is a copy of
``layer[l_k]``. So every *program position* owns its KV state; a repeated layer writes a second,
separate cache entry (the authors' release shares one slot between the two passes, which makes
results depend on the attention backend and on whether a cache is used).

**Schedule.** A batch holds rows with different programs. We merge them into one *schedule*: a
list of steps ``(layer, rows)``; every row whose next program position is that step's layer takes
part, so the weights of each step are read once for all its rows. Any layer sequence that contains
every row's program as a subsequence (a *common supersequence*) is a valid schedule, and decode
time is roughly proportional to its length (a decode step is memory-bound: a step serving one row
costs nearly as much as one serving all). Finding the shortest is NP-hard, so
:func:`build_schedule` takes the shorter of two heuristics: *greedy-min* (always run the smallest
pending layer: one sweep over ``0..D-1`` plus one extra step per repeated layer, optimal when the
rows' repeats don't overlap) and a *beam search* over merge states that keeps the states with the
smallest lower bound (longest remaining program, then total remaining work). The beam lets a row
wait for others that will need the same layer soon instead of running it alone right away; on 64
MCTS-like programs (1-3 skips/repeats of 1-4-layer blocks, 28 layers) it cuts the schedule from
~110 to ~77 steps. Each row's k-th program position maps to one fixed step for the whole
generation, so the KV cache is indexed by *step* (:class:`StepCache`) and holds only that step's
rows: memory equals the unrolled model's, no more.

The engine calls the model's own decoder-layer modules (attention, MLP, MoE, norms) and only
replaces the loop around them and the cache object they write into, so one code path serves Llama,
Qwen2, Qwen2-MoE, Qwen3, Mistral and other HF decoder-only models with a ``layers`` list.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from polar.errors import UnsupportedModelError
from polar.programs import full_program, validate_program

Prompt = str | Sequence[int]

#: Architectures whose equivalence with HF's own forward is covered by the test suite.
TESTED_MODEL_TYPES = {"llama", "qwen2", "qwen2_moe", "qwen3", "mistral"}


@dataclass
class Generation:
    """One sequence's greedy continuation."""

    token_ids: list[int]  # new tokens only, stop token excluded
    text: str
    layers_executed: int  # program length: layers run per token
    stopped: bool = False  # True when a stop token ended it (False: max_new_tokens reached)
    program: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- schedule


@dataclass
class Step:
    layer: int
    rows: torch.Tensor  # long, indices into the current batch
    all_rows: bool  # rows == arange(batch): no gather/scatter needed


#: Beam width of the schedule search: ~50 ms of CPU for 64 rows of ~30 layers, small next to the
#: decode time it saves (each step removed saves one layer per generated token).
SCHEDULE_BEAM = 64


def _greedy_min_order(programs: Sequence[Sequence[int]]) -> list[int]:
    """Layer order that always runs the smallest pending layer."""
    cursors = [0] * len(programs)
    order: list[int] = []
    while True:
        pending = [p[c] for p, c in zip(programs, cursors) if c < len(p)]
        if not pending:
            return order
        layer = min(pending)
        order.append(layer)
        for r, p in enumerate(programs):
            if cursors[r] < len(p) and p[cursors[r]] == layer:
                cursors[r] += 1


def _beam_order(programs: Sequence[Sequence[int]], width: int) -> list[int]:
    """Common supersequence of ``programs`` by beam search over cursor vectors.

    A state is every row's cursor; a move runs one layer for all rows whose next layer it is.
    States are ranked by a lower bound on the steps still needed (the longest remaining program),
    then by total remaining work; duplicates (reached by different orders) are merged by a hash
    of the cursors. Vectorised over states x layers x rows so that 64 rows take tens of ms.
    """
    import numpy as np

    rows = len(programs)
    lengths = np.array([len(p) for p in programs], dtype=np.int64)
    depth = max(max(p) for p in programs) + 1
    table = np.full((rows, int(lengths.max()) + 1), -1, dtype=np.int64)
    for r, p in enumerate(programs):
        table[r, : len(p)] = p
    salt = np.random.default_rng(0).integers(1, 1 << 62, rows)
    cursors = np.zeros((1, rows), dtype=np.int64)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    row_index, layers = np.arange(rows)[None, :], np.arange(depth)[None, :, None]
    while True:
        remaining = lengths[None, :] - cursors
        bound = remaining.max(1)
        if bound.min() == 0:
            state, order = int(np.argmin(bound)), []
            for parent, layer in reversed(history):
                order.append(int(layer[state]))
                state = int(parent[state])
            return order[::-1]
        moves = table[row_index, cursors][:, None, :] == layers  # [states, layers, rows]
        state_idx, layer_idx = np.nonzero(moves.any(-1))
        advance = moves[state_idx, layer_idx]
        left = remaining[state_idx] - advance
        rank = left.max(1) * (1 << 32) + left.sum(1)
        digest = ((cursors[state_idx] + advance) * salt).sum(1)
        ranked = np.lexsort((digest, rank))
        fresh = np.ones(len(ranked), dtype=bool)
        fresh[1:] = digest[ranked][1:] != digest[ranked][:-1]
        keep = ranked[fresh][:width]
        cursors = cursors[state_idx[keep]] + advance[keep]
        history.append((state_idx[keep], layer_idx[keep]))


def build_schedule(programs: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> list[Step]:
    """Merge per-row programs into shared steps (see module docstring).

    Every row advances by one program position in each step it takes part in, so the steps a
    row takes part in, read in order, are exactly its program.
    """
    programs = [list(p) for p in programs]
    order = _greedy_min_order(programs)
    distinct = {tuple(p) for p in programs}
    if len(distinct) > 1 and len(order) > max(len(p) for p in programs):
        beam = _beam_order(programs, SCHEDULE_BEAM)
        if len(beam) < len(order):
            order = beam
    cursors = [0] * len(programs)
    steps: list[Step] = []
    batch = len(programs)
    for layer in order:
        rows = [r for r, (p, c) in enumerate(zip(programs, cursors)) if c < len(p) and p[c] == layer]
        for r in rows:
            cursors[r] += 1
        steps.append(Step(layer, torch.tensor(rows, dtype=torch.long, device=device), len(rows) == batch))
    return steps


# --------------------------------------------------------------------------- cache


class StepCache:
    """KV storage indexed by schedule step, preallocated to ``capacity`` tokens.

    HF attention modules call ``cache.update(k, v, layer_idx, ...)`` with their *model* layer
    index; we ignore it and write into the slot of the step being run (``self.current``), which
    is what gives every program position its own state.
    """

    def __init__(self, num_steps: int, capacity: int):
        self.keys: list[torch.Tensor | None] = [None] * num_steps
        self.values: list[torch.Tensor | None] = [None] * num_steps
        self.capacity = capacity
        self.length = 0  # tokens already stored (same for every row: rows advance together)
        self.current = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int = 0, *args: Any, **kwargs: Any):
        step, start = self.current, self.length
        end = start + key.shape[-2]
        if self.keys[step] is None:
            shape = (*key.shape[:-2], self.capacity, key.shape[-1])
            self.keys[step] = key.new_empty(shape)
            self.values[step] = value.new_empty((*value.shape[:-2], self.capacity, value.shape[-1]))
        k_buf, v_buf = self.keys[step], self.values[step]
        k_buf[..., start:end, :] = key
        v_buf[..., start:end, :] = value
        return k_buf[..., :end, :], v_buf[..., :end, :]

    def keep_rows(self, steps: list[Step], keep: torch.Tensor) -> list[Step]:
        """Drop finished rows (``keep`` is a bool mask over the batch); return the new schedule."""
        new_index = torch.cumsum(keep.long(), 0) - 1
        batch = int(keep.sum())
        new_steps = []
        for s, step in enumerate(steps):
            mask = keep[step.rows]
            if self.keys[s] is not None and not bool(mask.all()):
                self.keys[s] = self.keys[s][mask]
                self.values[s] = self.values[s][mask]
            rows = new_index[step.rows[mask]]
            new_steps.append(Step(step.layer, rows, len(rows) == batch))
        return new_steps

    # Methods some HF code paths probe on cache objects.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class _ShareTracker:
    """Which rows of a fresh pass still hold identical states (see ``_run_layers``)."""

    def __init__(self, share: list[int]):
        self.ids = list(share)
        self._intern: dict[tuple[int, int], int] = {}

    def advance(self, rows: list[int], step: int) -> tuple[list[int], list[int]]:
        """Representatives of the rows taking part in ``step``, and for each row the position of
        its representative; then record that these rows took this step."""
        first: dict[int, int] = {}
        reps: list[int] = []
        expand: list[int] = []
        for r in rows:
            group = self.ids[r]
            if group not in first:
                first[group] = len(reps)
                reps.append(r)
            expand.append(first[group])
        for r in rows:
            key = (self.ids[r], step)
            self.ids[r] = self._intern.setdefault(key, len(self._intern) + len(self.ids))
        return reps, expand


class _ExpandingCache:
    """Wraps a cache during a shared first pass: the layer runs on representatives only, and
    their k/v are stored once per row. Valid only while the cache is empty before the call
    (a first pass), so attention needs nothing but the k/v just computed."""

    def __init__(self, inner: Any, expand: torch.Tensor):
        self.inner, self.expand = inner, expand

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        self.inner.update(key[self.expand], value[self.expand], *args, **kwargs)
        return key, value

    def get_seq_length(self, *args: Any) -> int:
        return 0


def share_groups(token_lists: Sequence[Sequence[int]]) -> list[int]:
    """Group id per row: rows with the same tokens get the same id."""
    seen: dict[tuple[int, ...], int] = {}
    return [seen.setdefault(tuple(t), len(seen)) for t in token_lists]


# --------------------------------------------------------------------------- runner


class ProgramRunner:
    """Run a HF decoder-only LM under arbitrary per-row programs of its layers.

    ``logits`` (no cache) and ``generate`` (greedy, KV cache) take one program per row; rows may
    all differ. The model is used as loaded; the runner keeps no per-request state on it.
    """

    def __init__(self, model: Any, tokenizer: Any = None, source: str | None = None, max_batch_size: int = 64):
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
        # Optional accelerated decoder for this device (static caches + CUDA graphs); it takes
        # over `_generate_chunk` and must give the same tokens. See polar/cuda_engine.py.
        self.fast_path: Any = None
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

    def enable_fast_path(self) -> bool:
        """Use the CUDA-graph decoder when the device and architecture allow it."""
        try:
            from polar.cuda_engine import CudaGraphDecoder
        except ImportError:
            return False
        if not CudaGraphDecoder.supports(self):
            return False
        self.fast_path = CudaGraphDecoder(self)
        return True

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
        """Token ids per prompt; strings are tokenised (BOS added unless the text already has it)."""
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer; pass token ids or a tokenizer")
                bos = getattr(self.tokenizer, "bos_token", None)
                add_special = not (bos and prompt.startswith(bos))
                out.append(list(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]))
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

    def _pad_left(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(t) for t in token_lists)
        pad = 0
        ids = torch.full((len(token_lists), width), pad, dtype=torch.long)
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for r, toks in enumerate(token_lists):
            ids[r, width - len(toks):] = torch.tensor(toks, dtype=torch.long)
            mask[r, width - len(toks):] = 1
        return ids.to(self.device), mask.to(self.device)

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
        self,
        hidden: torch.Tensor,
        steps: list[Step],
        masks: dict[int | None, torch.Tensor],
        position_ids: torch.Tensor,
        cache: Any,
        share: list[int] | None = None,
    ) -> torch.Tensor:
        """Run the schedule over ``hidden`` ``[B, T, H]``.

        ``share`` (a full pass over fresh prompts only, e.g. prefill) gives each row a group id;
        rows with the same id have identical inputs. Rows that also took part in the same steps
        so far still hold identical states, so each step computes one representative per such
        group and copies the result (and its KV) to the others: the programs of one question
        share the prompt and usually their first layers, which are then computed once.
        """
        cos, sin = self._backbone.rotary_emb(hidden, position_ids)
        groups = _ShareTracker(share) if share is not None else None
        for s, step in enumerate(steps):
            if len(step.rows) == 0:
                continue
            mask = masks[self._sliding.get(step.layer)]
            rows, expand, step_cache = step.rows, None, cache
            if groups is not None:
                reps, expand = groups.advance(step.rows.tolist(), s)
                if len(reps) < len(step.rows):
                    rows = torch.tensor(reps, dtype=torch.long, device=hidden.device)
                    expand = torch.tensor(expand, dtype=torch.long, device=hidden.device)
                    step_cache = _ExpandingCache(cache, expand) if cache is not None else None
                else:
                    expand = None
            if step.all_rows and expand is None:
                h, m, pe, pos = hidden, mask, (cos, sin), position_ids
            else:
                h, m, pe, pos = hidden[rows], mask[rows], (cos[rows], sin[rows]), position_ids[rows]
            if cache is not None:
                cache.current = s
            out = self._layers[step.layer](
                h, attention_mask=m, position_ids=pos, position_embeddings=pe,
                **{self._cache_kwarg: step_cache}, use_cache=cache is not None,
            )
            out = out[0] if isinstance(out, tuple) else out
            if expand is not None:
                out = out[expand]
            if step.all_rows:
                hidden = out
            else:
                hidden = hidden.index_copy(0, step.rows, out)
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
        input_ids = input_ids.to(self.device)
        programs = self._check_programs(programs, input_ids.shape[0])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        hidden = self._backbone.embed_tokens(input_ids)
        steps = build_schedule(programs, self.device)
        masks = self._attention_masks(attention_mask, input_ids.shape[1])
        rows = [tuple((ids * m).tolist()) + tuple(m.tolist()) for ids, m in zip(input_ids, attention_mask)]
        hidden = self._run_layers(hidden, steps, masks, self._positions(attention_mask), None, share=share_groups(rows))
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
            ids, mask = self._pad_left(chunk)
            hidden = self._backbone.embed_tokens(ids)
            if layer > 0:
                steps = build_schedule([list(range(layer))] * len(chunk), self.device)
                masks = self._attention_masks(mask, ids.shape[1])
                hidden = self._run_layers(hidden, steps, masks, self._positions(mask), None)
            for r, toks in enumerate(chunk):
                out.append(hidden[r, ids.shape[1] - len(toks):].float().cpu())
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

        Prompts are processed in chunks of ``batch_size`` (default ``max_batch_size``); inside a
        chunk all programs run in one heterogeneous batch. Sequences stop at a stop token
        (``stop_token_ids``, default :attr:`stop_token_ids`; an empty set never stops early).
        """
        stops = self._stop_ids if stop_token_ids is None else set(stop_token_ids)
        token_lists = self.encode(prompts)
        if programs is None:
            programs = [full_program(self.num_layers)] * len(token_lists)
        programs = self._check_programs(programs, len(token_lists))
        size = batch_size or self.max_batch_size
        results: list[Generation] = []
        for start in range(0, len(token_lists), size):
            chunk = token_lists[start:start + size]
            new_tokens, stopped = self._generate_chunk(chunk, programs[start:start + size], max_new_tokens, stops)
            for toks, stop, program in zip(new_tokens, stopped, programs[start:start + size]):
                text = self.tokenizer.decode(toks, skip_special_tokens=True) if self.tokenizer is not None else ""
                results.append(Generation(toks, text, len(program), stop, list(program)))
        return results

    @torch.inference_mode()
    def _generate_chunk(
        self, token_lists: list[list[int]], programs: list[list[int]], max_new_tokens: int, stops: set[int]
    ) -> tuple[list[list[int]], list[bool]]:
        if self.fast_path is not None:
            return self.fast_path.generate_chunk(token_lists, programs, max_new_tokens, stops)
        batch = len(token_lists)
        outputs: list[list[int]] = [[] for _ in range(batch)]
        stopped = [False] * batch
        if max_new_tokens <= 0:
            return outputs, stopped
        ids, key_valid = self._pad_left(token_lists)
        steps = build_schedule(programs, self.device)
        cache = StepCache(len(steps), ids.shape[1] + max_new_tokens)
        positions = self._positions(key_valid)
        origin = torch.arange(batch, device=self.device)  # batch row -> original index
        stop_ids = torch.tensor(sorted(stops) or [-1], device=self.device)

        hidden = self._backbone.embed_tokens(ids)
        masks = self._attention_masks(key_valid, ids.shape[1])
        hidden = self._run_layers(hidden, steps, masks, positions, cache, share=share_groups(token_lists))
        cache.length = ids.shape[1]
        last_pos = positions[:, -1:]
        for t in range(max_new_tokens):
            logits = self.model.lm_head(self._backbone.norm(hidden[:, -1:]))[:, -1]
            next_tokens = logits.argmax(-1)
            done = torch.isin(next_tokens, stop_ids)
            for row, (orig, tok, fin) in enumerate(zip(origin.tolist(), next_tokens.tolist(), done.tolist())):
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
            hidden = self._backbone.embed_tokens(next_tokens[:, None])
            masks = self._attention_masks(key_valid, 1)
            hidden = self._run_layers(hidden, steps, masks, last_pos, cache)
            cache.length += 1
        return outputs, stopped

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

