"""PNG plots: files are real images, and the per-layer shares are the counted ones."""

from __future__ import annotations

import pytest

from polar.plots import (
    MAX_HEATMAP_ROWS,
    layer_change_shares,
    plot_accuracy_vs_layers,
    plot_layer_heatmap,
    plot_program_lengths,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_layer_change_shares_by_hand():
    programs = [[0, 2, 3], [0, 1, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3]]
    skipped, repeated = layer_change_shares(programs, 4)
    # layer 0 skipped by the last program; layer 1 by the first; 1 and 3 repeated once each
    assert skipped == [0.25, 0.25, 0.0, 0.0]
    assert repeated == [0.0, 0.25, 0.0, 0.25]


def test_length_histogram_accepts_programs_or_lengths(tmp_path):
    a = plot_program_lengths([[0, 1], [0, 2, 3], [0, 1, 2, 3, 3]], 4, tmp_path / "a.png")
    b = plot_program_lengths([2, 3, 5, 5], 4, tmp_path / "sub" / "b.png", title="lengths")
    c = plot_program_lengths([], 4, tmp_path / "c.png")
    assert all(_is_png(p) for p in (a, b, c))


@pytest.mark.parametrize("count", [3, MAX_HEATMAP_ROWS + 5])
def test_heatmap_per_program_and_aggregate(tmp_path, count):
    programs = [[i % 6 for i in range(6) if i != k % 6] for k in range(count)]
    path = plot_layer_heatmap(programs, 6, tmp_path / f"h{count}.png")
    assert _is_png(path)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_accuracy_vs_layers(tmp_path):
    points = [
        {"label": "full depth", "mean_layers": 30, "accuracy": 0.4},
        {"label": "PoLar", "mean_layers": 26.5, "accuracy": 0.52},
    ]
    assert _is_png(plot_accuracy_vs_layers(points, 30, tmp_path / "acc.png"))
