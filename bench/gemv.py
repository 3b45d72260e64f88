"""One-row projections of a decode step: cuBLAS (``F.linear`` + separate norm/activation/residual
kernels, what the compiled layer runs) vs :mod:`polar.gemv` (one Triton kernel with them fused).

For each matrix of a layer of the given shape (q/k/v, o_proj, gate/up, down) and the LM head:
microseconds per call and the weight-read bandwidth reached, measured inside a CUDA graph of many
calls (so launch costs are those of a graph, as in decode), cycling over enough copies of the
weight that L2 never holds it. Also tries a few tile shapes for the Triton kernel.

Usage: ``python bench/gemv.py --json gemv.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceilings import copy_bandwidth  # noqa: E402
from polar import gemv as gv  # noqa: E402

SHAPES = {  # Llama-3.2-3B: (rows, columns, prologue, residual)
    "qkv": (5120, 3072, "rmsnorm", False),
    "o_proj": (3072, 3072, "none", True),
    "gate_up": (16384, 3072, "rmsnorm", False),
    "down": (3072, 8192, "silu_mul", True),
    "lm_head": (128256, 3072, "rmsnorm", False),
}
TILES = [  # (rows per program, columns per iteration, warps, pipeline stages)
    (4, 512, 4, 3), (1, 1024, 4, 3), (1, 2048, 4, 3), (1, 2048, 8, 3), (1, 4096, 8, 3), (2, 1024, 4, 3),
    (2, 2048, 8, 3), (2, 512, 2, 3), (4, 512, 2, 3), (4, 1024, 8, 3), (2, 1024, 4, 1), (1, 2048, 4, 1),
    (4, 512, 4, 1), (2, 1024, 2, 3), (1, 1024, 2, 3), (1, 512, 1, 3),
]


def graph_us(calls: list[Callable[[], object]], reps: int = 5) -> float:
    """Microseconds per call: all ``calls`` captured in one graph, replayed, median of ``reps``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compiles, library handles
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(times[1:])[len(times[1:]) // 2]


def cublas_call(x, weight, norm, residual, prologue) -> Callable[[], object]:
    """What the compiled layer runs today, without Inductor's fusion of the small kernels."""
    def call():
        return gv.gemv_reference(x, weight, None, residual, prologue, norm, 1e-5)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies_gb", type=float, default=1.0, help="weight bytes cycled per shape (beats L2)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available() and gv.operator() is not None, "needs CUDA and Triton"
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = {"copy_bandwidth_TBps": round(bandwidth / 1e12, 2), "shapes": {}}
    for name, (n, k, prologue, has_residual) in SHAPES.items():
        bytes_ = n * k * 2
        copies = max(2, int(args.copies_gb * 1e9 // bytes_))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
        x = torch.randn(2 * k if prologue == "silu_mul" else k, device="cuda", dtype=torch.bfloat16)
        norm = torch.ones(k, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_residual else None
        row = {"rows": n, "cols": k, "prologue": prologue, "MB": round(bytes_ / 1e6, 1),
               "roofline_us": round(bytes_ / bandwidth * 1e6, 2)}
        row["cublas_us"] = graph_us([cublas_call(x, w, norm, residual, prologue) for w in weights])
        xk = x[:k]
        row["cublas_linear_only_us"] = graph_us([lambda w=w: F.linear(xk, w) for w in weights])
        best = None
        for bn, bk, warps, stages in TILES:
            us = graph_us([lambda w=w: gv.gemv_triton(x, w, None, residual, prologue, norm, 1e-5, bn, bk, warps, stages)
                           for w in weights])
            row[f"triton_{bn}x{bk}w{warps}s{stages}_us"] = round(us, 2)
            if best is None or us < best[0]:
                best = (us, f"{bn}x{bk}w{warps}s{stages}")
        row["triton_best_us"], row["triton_best_tile"] = round(best[0], 2), best[1]
        row["default_us"] = round(graph_us([lambda w=w: gv.gemv_triton(x, w, None, residual, prologue, norm, 1e-5)
                                            for w in weights]), 2)
        ref = gv.gemv_reference(x, weights[0], None, residual, prologue, norm, 1e-5).float()
        ours = gv.gemv_triton(x, weights[0], None, residual, prologue, norm, 1e-5).float()
        row["max_rel_diff"] = float((ours - ref).abs().max() / ref.abs().max())
        print(f"{name:8s} {row['MB']:7.1f} MB  roofline {row['roofline_us']:7.1f} us  cuBLAS(+eager ops) "
              f"{row['cublas_us']:7.1f} us (linear alone {row['cublas_linear_only_us']:7.1f})  triton default {row['default_us']:7.1f} us  best {row['triton_best_us']:7.1f} "
              f"us ({row['triton_best_tile']})", flush=True)
        results["shapes"][name] = row
        del weights
        torch.cuda.empty_cache()
    results["qkv_rope"] = qkv_rope_times(args.copies_gb)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def qkv_rope_times(copies_gb: float) -> dict[str, float]:
    """The q/k/v kernel with norm, rotary and KV writes fused (the decoder's batch-1 path for
    layers without q/k norms), by tile, on the 3B shape."""
    n, k, dim, kv_heads = 5120, 3072, 128, 8
    copies = max(2, int(copies_gb * 1e9 // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    norm = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    cos, sin = torch.rand(2, dim, device="cuda", dtype=torch.bfloat16)
    column = torch.tensor([100], device="cuda")
    keys, values = torch.zeros(2, 1, kv_heads, 384, dim, device="cuda", dtype=torch.bfloat16)
    out = {}
    for pairs, block_k, warps in [(1, 512, 4), (2, 512, 4), (2, 1024, 4), (4, 512, 4), (1, 1024, 4), (2, 512, 2)]:
        us = graph_us([lambda w=w: gv.qkv_rope_triton(x, norm, 1e-5, w, None, cos, sin, column, keys, values,
                                                       pairs, block_k, warps) for w in weights])
        out[f"{pairs}pairs_{block_k}w{warps}_us"] = round(us, 2)
    print(f"qkv+rope+KV write: {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
