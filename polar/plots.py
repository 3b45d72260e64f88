"""PNG plots shared by search, evaluation and the demo report.

Matplotlib runs on the non-interactive Agg backend so plots work on headless machines and in
tests. Every function saves one PNG and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from polar.programs import count_changes  # noqa: E402

# Above this many programs the heatmap shows per-layer shares instead of one row per program.
MAX_HEATMAP_ROWS = 40


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)  # readers never see a half-written image
    return path


def plot_program_lengths(
    programs_or_lengths: Sequence[Sequence[int] | int],
    num_layers: int,
    path: str | os.PathLike,
    title: str = "Lengths of valid programs",
) -> Path:
    """Histogram of program lengths, with the full depth D marked for reference."""
    lengths = [x if isinstance(x, int) else len(x) for x in programs_or_lengths]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if lengths:
        lo, hi = min(lengths + [num_layers]), max(lengths + [num_layers])
        ax.hist(lengths, bins=range(lo, hi + 2), align="left", color="#4c72b0", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no programs", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(num_layers, color="#c44e52", linestyle="--", label=f"full depth D={num_layers}")
    ax.set_xlabel("program length (layers executed)")
    ax.set_ylabel("programs")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_layer_heatmap(
    programs: Sequence[Sequence[int]],
    num_layers: int,
    path: str | os.PathLike,
    title: str = "Skipped and repeated layers",
) -> Path:
    """Which layers programs skip or repeat.

    Up to :data:`MAX_HEATMAP_ROWS` programs: one row per program, each cell skip / keep / repeat.
    More programs: two rows, the share of programs that skip and that repeat each layer.
    """
    if len(programs) <= MAX_HEATMAP_ROWS:
        return _per_program_heatmap(programs, num_layers, path, title)
    grid = list(layer_change_shares(programs, num_layers))
    n = len(programs)
    fig, ax = plt.subplots(figsize=(max(6, num_layers * 0.25), 2.2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, max(map(max, grid))))
    ax.set_yticks([0, 1], ["skipped share", "repeated share"])
    ax.set_xlabel("layer")
    ax.set_title(f"{title} ({n} programs)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _save(fig, path)


def layer_change_shares(programs: Sequence[Sequence[int]], num_layers: int) -> tuple[list[float], list[float]]:
    """Per layer: the share of programs that skip it and the share that run it more than once."""
    skipped = [0.0] * num_layers
    repeated = [0.0] * num_layers
    for program in programs:
        s, r = count_changes(program, num_layers)
        for layer in range(num_layers):
            skipped[layer] += s[layer]
            repeated[layer] += 1 if r[layer] else 0
    n = max(1, len(programs))
    return [x / n for x in skipped], [x / n for x in repeated]


def _per_program_heatmap(
    programs: Sequence[Sequence[int]], num_layers: int, path: str | os.PathLike, title: str
) -> Path:
    # cell value: 0 skip, 1 keep, 2 repeat (ran more than once)
    grid = []
    for program in programs:
        s, r = count_changes(program, num_layers)
        grid.append([0 if s[layer] else (2 if r[layer] else 1) for layer in range(num_layers)])
    fig, ax = plt.subplots(figsize=(max(6, num_layers * 0.25), max(1.5, 0.25 * len(grid) + 1)))
    cmap = ListedColormap(["#c44e52", "#e8e8e8", "#4c72b0"])
    if grid:
        ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in cmap.colors]
    ax.legend(handles, ["skip", "keep", "repeat"], loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xlabel("layer")
    ax.set_ylabel("program")
    ax.set_title(title)
    return _save(fig, path)


def plot_accuracy_vs_layers(
    points: Sequence[dict[str, Any]],
    num_layers: int,
    path: str | os.PathLike,
    title: str = "Accuracy vs. executed layers",
) -> Path:
    """Scatter of methods: mean executed layers (x) against accuracy (y), D marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for point in points:
        ax.scatter(point["mean_layers"], point["accuracy"], s=40)
        ax.annotate(str(point["label"]), (point["mean_layers"], point["accuracy"]),
                    textcoords="offset points", xytext=(5, 5))
    ax.axvline(num_layers, color="#888888", linestyle="--", label=f"full depth D={num_layers}")
    ax.set_xlabel("mean executed layers")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path)
