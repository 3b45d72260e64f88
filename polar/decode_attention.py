"""One-token attention over static KV buffers that reads only each row's valid columns (Triton).

The CUDA decoder keeps every step's KV in a buffer of ``Tcap`` columns per row: a row's prompt
sits right-aligned before column ``W`` and each new token is written at the next column. Masked
SDPA reads all ``Tcap`` columns of every row, including left padding, columns not yet written and
the padding rows of a bucket; in a search round that is most of the bytes attention moves, and
decode attention was the largest item of a round's device time. This kernel reads columns
``start[b] .. column`` of row ``b`` only (nothing for rows whose ``start`` is past ``column``),
handles grouped-query attention by loading each KV head once for its group of query heads, and
splits long rows across programs when the batch alone cannot fill the device (flash-decoding:
partial softmax statistics per split, then one combine kernel; with one split, the common case in
a large batch, the kernel normalises and writes the output itself and no combine runs).

It is registered as the operator ``polar::decode_attention`` so that ``torch.compile`` keeps it
as one opaque call inside the compiled layer, and CUDA graphs capture it like any kernel.
:func:`decode_attention_reference` states the same function in plain PyTorch (tests compare the
two; on a machine without Triton the decoder uses masked SDPA instead).
"""

from __future__ import annotations

import functools
import math

import torch

#: Columns per inner iteration.
BLOCK_N = 64

#: Most programs one row's columns are split over. The split count is a runtime argument (not a
#: compile-time constant), so every batch size shares one compiled kernel.
MAX_SPLITS = 64


def decode_attention_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor, column: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q [B, Hq, d]`` attends to ``keys/values [B, Hkv, T, d]`` columns ``start[b] .. column``
    (inclusive); grouped heads share a KV head. Rows with no column give zeros. fp32 math."""
    batch, heads, dim = q.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    cols = torch.arange(total, device=q.device)
    valid = (cols[None, :] >= start[:, None].long()) & (cols[None, :] <= column.long().view(1, 1))  # [B, T]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bht,bhtd->bhd", weights, v).to(q.dtype)


@functools.lru_cache(maxsize=1)
def _kernels():
    """Compile-on-first-use Triton kernels (Triton is imported only where it runs)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["splits"])
    def partial_kernel(
        q_ptr, k_ptr, v_ptr, start_ptr, column_ptr, acc_ptr, stat_ptr, scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, splits,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
        PRECISION: tl.constexpr, DIRECT: tl.constexpr, out_ptr=None,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        start = tl.load(start_ptr + b).to(tl.int32)
        end = tl.load(column_ptr).to(tl.int32) + 1
        length = end - start
        per_split = tl.cdiv(tl.cdiv(tl.maximum(length, 0), splits), BLOCK) * BLOCK
        lo = start + split * per_split
        hi = tl.minimum(lo + per_split, end)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM)
        head = h * GROUP + g
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)
        m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], dtype=tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        for n in range(lo, hi, BLOCK):
            cols = n + tl.arange(0, BLOCK)
            inside = cols < hi
            k = tl.load(k_base + cols[:, None] * stride_kt + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(inside[None, :], s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            p = tl.where(inside[None, :], p, 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        keep = g < GROUP
        if DIRECT:  # one split: this program saw every column, so it writes the output itself
            out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
            rows = b * tl.num_programs(1) * GROUP + head
            tl.store(out_ptr + rows[:, None] * DIM + d[None, :], out.to(out_ptr.dtype.element_ty), mask=keep[:, None])
        else:
            row = (b * tl.num_programs(1) * GROUP + head) * splits + split  # [GROUP_PAD]
            tl.store(acc_ptr + row[:, None] * DIM + d[None, :], acc, mask=keep[:, None])
            tl.store(stat_ptr + row * 2, m_i, mask=keep)
            tl.store(stat_ptr + row * 2 + 1, l_i, mask=keep)

    @triton.jit(do_not_specialize=["splits"])
    def combine_kernel(acc_ptr, stat_ptr, out_ptr, splits, SPLITS_PAD: tl.constexpr, DIM: tl.constexpr):
        row = tl.program_id(0)  # one (batch row, query head)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, DIM)
        inside = s < splits
        m = tl.load(stat_ptr + (row * splits + s) * 2, mask=inside, other=-1.0e30)
        l = tl.load(stat_ptr + (row * splits + s) * 2 + 1, mask=inside, other=0.0)
        acc = tl.load(acc_ptr + (row * splits + s)[:, None] * DIM + d[None, :], mask=inside[:, None], other=0.0)
        top = tl.max(m, 0)
        w = tl.exp(m - top)
        w = tl.where(inside, w, 0.0)
        total = tl.sum(l * w, 0)
        out = tl.sum(acc * w[:, None], 0) / tl.maximum(total, 1.0e-30)
        tl.store(out_ptr + row * DIM + d, out.to(out_ptr.dtype.element_ty))

    return partial_kernel, combine_kernel


def splits_for(batch: int, kv_heads: int, columns: int) -> int:
    """Programs per (row, KV head): enough to give ~2 programs per multiprocessor, never more
    than the columns allow. A function of shapes only, so a captured graph keeps its value."""
    if not torch.cuda.is_available():
        sms = 132
    else:
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    wanted = math.ceil(2 * sms / max(1, batch * kv_heads))
    return max(1, min(wanted, math.ceil(columns / BLOCK_N), MAX_SPLITS))


def decode_attention_triton(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor, column: torch.Tensor, scale: float
) -> torch.Tensor:
    """The Triton implementation of :func:`decode_attention_reference` (same arguments)."""
    partial_kernel, combine_kernel = _kernels()
    batch, heads, dim = q.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    splits = splits_for(batch, kv_heads, total)
    q = q.contiguous()
    out = torch.empty_like(q)
    direct = splits == 1  # large batches: no partial results, no combine kernel
    # (with one split the partial buffers are never touched: a one-element placeholder each)
    acc = torch.empty(1 if direct else batch * heads * splits, dim, device=q.device, dtype=torch.float32)
    stats = torch.empty(1 if direct else batch * heads * splits, 2, device=q.device, dtype=torch.float32)
    group_pad = max(16, 1 << (group - 1).bit_length())
    partial_kernel[(batch, kv_heads, splits)](
        q, keys, values, start, column, acc, stats, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), splits,
        GROUP=group, GROUP_PAD=group_pad, DIM=dim, BLOCK=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact; bf16 ignores it
        DIRECT=direct, out_ptr=out,
    )
    if not direct:
        combine_kernel[(batch * heads,)](acc, stats, out, splits, SPLITS_PAD=MAX_SPLITS, DIM=dim)
    return out


@functools.lru_cache(maxsize=1)
def operator():
    """``polar::decode_attention`` as a torch operator (registered once), or None without Triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None

    @torch.library.custom_op("polar::decode_attention", mutates_args=())
    def decode_attention(
        q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor, column: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return decode_attention_triton(q, keys, values, start, column, scale)

    @decode_attention.register_fake
    def _(q, keys, values, start, column, scale):
        return torch.empty_like(q)

    return decode_attention


def supported(head_dim: int, heads: int, kv_heads: int) -> bool:
    """Shapes the kernel handles: a power-of-two head size of at least 16, whole query groups."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads % kv_heads == 0
