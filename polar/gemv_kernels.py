"""Triton kernels of :mod:`polar.gemv` (imported only where Triton is installed).

Module-level functions, so that kernels can call the shared RMSNorm helpers both compiled and in
Triton's CPU interpreter (which resolves names through the module's globals).
"""

import triton
import triton.language as tl


@triton.jit
def rms_inverse(x_ptr, k_cols, eps, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) over the whole row, in fp32 (as the HF RMSNorm)."""
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, k_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + cols, mask=cols < k_cols, other=0.0).to(tl.float32)
        sq += v * v
    return 1.0 / tl.sqrt(tl.sum(sq, 0) / k_cols + eps)


@triton.jit
def normed(x_ptr, norm_ptr, cols, col_ok, rstd, dtype: tl.constexpr):
    """Columns ``cols`` of the HF RMSNorm's output: normalised value rounded to the model dtype,
    times the norm weight in the model dtype."""
    v = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.load(norm_ptr + cols, mask=col_ok, other=0.0)
    return (g * (v * rstd).to(dtype)).to(tl.float32)


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, norm_ptr, n_rows, k_cols, stride_w, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    dtype = out_ptr.dtype.element_ty
    rstd = 1.0
    if PROLOGUE == 1:
        rstd = rms_inverse(x_ptr, k_cols, eps, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, k_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_cols
        if PROLOGUE == 1:
            v = normed(x_ptr, norm_ptr, cols, col_ok, rstd, dtype)
        elif PROLOGUE == 2:
            gate = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + k_cols + cols, mask=col_ok, other=0.0)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            v = (act * up).to(tl.float32)
        else:
            v = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc += w.to(tl.float32) * v[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = y.to(dtype)  # F.linear's rounding, before the residual add
    if HAS_RES:
        y = (tl.load(res_ptr + rows, mask=row_ok, other=0.0) + y).to(dtype)
    tl.store(out_ptr + rows, y, mask=row_ok)


@triton.jit
def qkv_rope_kernel(
    x_ptr, norm_ptr, w_ptr, bias_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, column_ptr, k_cols, eps,
    q_rows, kv_rows, stride_w, stride_kh, stride_kt, stride_vh, stride_vt,
    HALF: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # Each program computes PAIRS rotary pairs (rows j and j + d/2 of one head), so the
    # rotation happens in registers and k/v go straight into the KV buffers.
    pid = tl.program_id(0)
    first = pid * PAIRS  # pair index; a head holds HALF pairs
    head = first // HALF
    j = first % HALF + tl.arange(0, PAIRS)
    rows_a = head * 2 * HALF + j
    rows_b = rows_a + HALF
    dtype = q_ptr.dtype.element_ty
    rstd = rms_inverse(x_ptr, k_cols, eps, BLOCK_K)
    acc_a = tl.zeros([PAIRS, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([PAIRS, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, k_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_cols
        v = normed(x_ptr, norm_ptr, cols, col_ok, rstd, dtype)
        wa = tl.load(w_ptr + rows_a[:, None] * stride_w + cols[None, :], mask=col_ok[None, :], other=0.0)
        wb = tl.load(w_ptr + rows_b[:, None] * stride_w + cols[None, :], mask=col_ok[None, :], other=0.0)
        acc_a += wa.to(tl.float32) * v[None, :]
        acc_b += wb.to(tl.float32) * v[None, :]
    ya, yb = tl.sum(acc_a, 1), tl.sum(acc_b, 1)
    if HAS_BIAS:
        ya += tl.load(bias_ptr + rows_a).to(tl.float32)
        yb += tl.load(bias_ptr + rows_b).to(tl.float32)
    ya = ya.to(dtype).to(tl.float32)  # F.linear's rounding
    yb = yb.to(dtype).to(tl.float32)
    column = tl.load(column_ptr)
    if head * 2 * HALF >= q_rows + kv_rows:  # v: no rotation, into the value buffer
        kv_head = (head * 2 * HALF - q_rows - kv_rows) // (2 * HALF)
        base = v_ptr + kv_head * stride_vh + column * stride_vt
        tl.store(base + j, ya.to(v_ptr.dtype.element_ty))
        tl.store(base + j + HALF, yb.to(v_ptr.dtype.element_ty))
    else:
        ca = tl.load(cos_ptr + j).to(tl.float32)
        cb = tl.load(cos_ptr + j + HALF).to(tl.float32)
        sa = tl.load(sin_ptr + j).to(tl.float32)
        sb = tl.load(sin_ptr + j + HALF).to(tl.float32)
        ra = ya * ca - yb * sa
        rb = yb * cb + ya * sb
        if head * 2 * HALF >= q_rows:  # k: rotated, into the key buffer
            kv_head = (head * 2 * HALF - q_rows) // (2 * HALF)
            base = k_ptr + kv_head * stride_kh + column * stride_kt
            tl.store(base + j, ra.to(k_ptr.dtype.element_ty))
            tl.store(base + j + HALF, rb.to(k_ptr.dtype.element_ty))
        else:
            tl.store(q_ptr + rows_a, ra.to(dtype))
            tl.store(q_ptr + rows_b, rb.to(dtype))
