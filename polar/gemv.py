"""One-row matrix-vector products for batch-1 decode (Triton), with the layer's neighbours fused in.

At batch 1 a decoder layer is four weight reads (q/k/v, o_proj, gate/up, down) and a handful of
small elementwise kernels between them (two RMSNorms, SiLU·up, two residual adds). The weight
reads set the floor (~47 µs per layer of the Llama-3.2-3B shape on an H200); the small kernels
add a launch and a tail each. This module computes ``y = W @ f(x) (+ bias) (+ residual)`` for one
row in a single kernel, where ``f`` is one of

* ``"none"``: ``x`` itself;
* ``"rmsnorm"``: the HF RMSNorm of ``x`` (fp32 statistics, normalised value rounded to the model
  dtype, then times the norm weight in the model dtype), recomputed by every program from ``x``
  (a few KB, read from L2);
* ``"silu_mul"``: ``silu(gate) * up`` with ``x = [gate; up]``, as HF's gated MLP rounds it.

The weight is read once, in tiles of a few rows by ~1,000 columns, products accumulated in fp32.
Measured against cuBLAS on the 3B shapes (``bench/gemv.py``), it wins where cuBLAS reaches least
of the bandwidth (o_proj 6.8 vs 10.1 µs, down 17.1 vs 18.5 µs, their residual adds and SiLU·up
included) and on q/k/v with its norm; cuBLAS stays faster on the 100 MB gate/up matrix (every
program re-reads the normed input) and on the LM head, so the decoder uses cuBLAS there.

For layers without per-head q/k norms, ``polar::qkv_rope`` goes one step further on q/k/v: norm,
projection, rotary embedding and the k/v writes into the KV buffers in one kernel (each program
owns the row pairs that rotary mixes), so the layer's small rotary and KV-copy kernels disappear.

Both are registered as torch operators (``polar::gemv``, ``polar::qkv_rope``), so ``torch.compile``
keeps each as one opaque call and CUDA graphs capture them. :func:`gemv_reference` and
:func:`qkv_rope_reference` state the same functions in plain PyTorch (the tests compare them).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PROLOGUES = ("none", "rmsnorm", "silu_mul")


def gemv_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
    prologue: str = "none", norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
) -> torch.Tensor:
    """``x [K or 2K]`` (one row) -> ``[N]``: what the HF modules compute, in the model dtype."""
    if prologue == "rmsnorm":
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = norm_weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    elif prologue == "silu_mul":
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


def qkv_rope_reference(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
    cos: torch.Tensor, sin: torch.Tensor, column: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
) -> torch.Tensor:
    """One row's q/k/v projection with RMSNorm before and rotary after (half-split layout): k and v
    are written into ``keys/values [1, Hkv, T, d]`` at ``column``; returns the rotated q ``[Hq*d]``.
    ``cos/sin [d]`` are the row's rotary angles. As the HF Llama layer rounds it, in the model dtype."""
    kv_heads, dim = keys.shape[1], keys.shape[-1]
    qkv = gemv_reference(x, weight, bias, None, "rmsnorm", norm_weight, eps)
    q, k, v = qkv.split([qkv.numel() - 2 * kv_heads * dim, kv_heads * dim, kv_heads * dim])

    def rotate(t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, dim)
        half = dim // 2
        return t * cos + torch.cat((-t[:, half:], t[:, :half]), -1) * sin

    keys[0].index_copy_(1, column.view(1), rotate(k).to(keys.dtype)[:, None])
    values[0].index_copy_(1, column.view(1), v.view(kv_heads, 1, dim).to(values.dtype))
    return rotate(q).reshape(-1)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The one-row product and the q/k/v kernel (:mod:`polar.gemv_kernels`, compiled on first use;
    Triton is imported only where they run)."""
    from polar import gemv_kernels

    return gemv_kernels.gemv_kernel, gemv_kernels.qkv_rope_kernel


def tile_for(prologue: str) -> tuple[int, int, int, int]:
    """(rows per program, columns per iteration, warps, pipeline stages), measured on an H200 over
    the Llama-3.2-3B shapes (``bench/gemv.py`` sweeps the alternatives). Few rows per program keep
    many programs in flight; an RMSNorm prologue re-reads ``x`` in every program, so it takes
    more rows per program (fewer re-reads)."""
    return (4, 512, 4, 1) if prologue == "rmsnorm" else (2, 1024, 4, 1)


def gemv_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
    prologue: str = "none", norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
) -> torch.Tensor:
    """The Triton implementation of :func:`gemv_reference` (same arguments; tile overrides for
    benchmarks)."""
    n_rows, k_cols = weight.shape
    x = x.reshape(-1).contiguous()
    expected = 2 * k_cols if prologue == "silu_mul" else k_cols
    if x.numel() != expected or weight.stride(1) != 1:
        raise ValueError(f"gemv: x has {x.numel()} values for a weight of shape {tuple(weight.shape)}")
    out = torch.empty(n_rows, device=x.device, dtype=x.dtype)
    tile = tile_for(prologue)
    bn = block_n or tile[0]
    _kernels()[0][(-(-n_rows // bn),)](
        x, weight, out, bias if bias is not None else out, residual.reshape(-1) if residual is not None else out,
        norm_weight if norm_weight is not None else x, n_rows, k_cols, weight.stride(0), float(eps),
        BLOCK_N=bn, BLOCK_K=block_k or tile[1], PROLOGUE=PROLOGUES.index(prologue), HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, num_warps=num_warps or tile[2], num_stages=num_stages or tile[3],
    )
    return out


#: Rotary pairs per program of the q/k/v kernel (rows per program: twice this).
QKV_PAIRS = 2


def qkv_rope_triton(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
    cos: torch.Tensor, sin: torch.Tensor, column: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    pairs: int | None = None, block_k: int = 512, num_warps: int = 4,
) -> torch.Tensor:
    """The Triton implementation of :func:`qkv_rope_reference` (same arguments)."""
    n_rows, k_cols = weight.shape
    kv_heads, dim = keys.shape[1], keys.shape[-1]
    pairs = pairs or QKV_PAIRS
    half = dim // 2
    if keys.shape[0] != 1 or n_rows % dim or half % pairs or weight.stride(1) != 1 or keys.stride(-1) != 1:
        raise ValueError(f"qkv_rope: unsupported shapes {tuple(weight.shape)}, {tuple(keys.shape)}")
    q_rows = n_rows - 2 * kv_heads * dim
    q = torch.empty(q_rows, device=x.device, dtype=x.dtype)
    _kernels()[1][(n_rows // (2 * pairs),)](
        x.reshape(-1), norm_weight, weight, bias if bias is not None else q, q, keys, values,
        cos.reshape(-1), sin.reshape(-1), column, k_cols, float(eps), q_rows, kv_heads * dim, weight.stride(0),
        keys.stride(1), keys.stride(2), values.stride(1), values.stride(2),
        HALF=half, PAIRS=pairs, BLOCK_K=block_k, HAS_BIAS=bias is not None, num_warps=num_warps, num_stages=1,
    )
    return q


@functools.lru_cache(maxsize=1)
def operator():
    """Register ``polar::gemv`` and ``polar::qkv_rope`` (once); returns the first, or None without
    Triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None

    @torch.library.custom_op("polar::gemv", mutates_args=())
    def gemv(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
        prologue: str, norm_weight: torch.Tensor | None, eps: float,
    ) -> torch.Tensor:
        return gemv_triton(x, weight, bias, residual, prologue, norm_weight, eps)

    @gemv.register_fake
    def _(x, weight, bias, residual, prologue, norm_weight, eps):
        return x.new_empty(weight.shape[0])

    @torch.library.custom_op("polar::qkv_rope", mutates_args=("keys", "values"))
    def qkv_rope(
        x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
        cos: torch.Tensor, sin: torch.Tensor, column: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    ) -> torch.Tensor:
        return qkv_rope_triton(x, norm_weight, eps, weight, bias, cos, sin, column, keys, values)

    @qkv_rope.register_fake
    def _(x, norm_weight, eps, weight, bias, cos, sin, column, keys, values):
        return x.new_empty(weight.shape[0] - 2 * keys.shape[1] * keys.shape[-1])

    return gemv
