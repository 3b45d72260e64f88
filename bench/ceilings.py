"""The device's two ceilings, measured where the benchmark runs: copy bandwidth and matmul rate.

Benchmarks state their limits as work over these (bytes at the copy bandwidth, FLOPs at the matmul
rate), measured in the same run, rather than datasheet figures.
"""

from __future__ import annotations

import statistics

import torch


def copy_bandwidth(gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n * 2 / statistics.median(times[3:])


def matmul_rate(size: int = 8192, reps: int = 10, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul FLOP/s on random data (median of ``reps`` products after 3 warm-ups)."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * size**3 / statistics.median(times[3:])
