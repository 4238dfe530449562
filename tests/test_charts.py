"""The run folder's PNG charts: ticks, and that what is plotted is what was measured."""

from __future__ import annotations

import csv
import io

import numpy as np
from PIL import Image, ImageColor

from fedcare.server import charts, results


def _colours(png: bytes) -> set[tuple[int, int, int]]:
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return {tuple(int(c) for c in px) for px in np.unique(img, axis=0)}


def test_nice_ticks_are_round_and_cover_the_range():
    assert charts.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(1, 5, integer=True) == [1, 2, 3, 4, 5]
    assert charts.nice_ticks(1, 40, integer=True) == [10, 20, 30, 40]
    assert charts.nice_ticks(3.0, 3.0)  # a flat series still gets an axis
    assert charts.nice_ticks(0.0, float("nan")) == []


def test_each_line_is_drawn_in_its_own_colour_and_an_empty_panel_draws_none():
    lines = [charts.Line(f"site{i}", [(1, 0.5 + i / 10), (2, 0.6), (3, 0.7)]) for i in range(3)]
    png = charts.png_bytes([charts.Panel("acc", "round", "accuracy", lines=lines),
                            charts.Panel("eps", note="no DP (ε = ∞)")])
    seen = _colours(png)
    assert all(ImageColor.getrgb(c) in seen for c in charts.PALETTE[:3])
    assert ImageColor.getrgb(charts.PALETTE[3]) not in seen
    empty = charts.png_bytes([charts.Panel("eps", note="no DP")])
    hues = [c for c in charts.PALETTE if not c[1:3] == c[3:5] == c[5:7]]  # greys also come from anti-aliased text
    assert not any(ImageColor.getrgb(c) in _colours(empty) for c in hues)


def test_progress_plot_summarises_many_sites_as_a_band(tmp_path):
    fields = ["round", "site", "phase", "accuracy", "epsilon"]
    with (tmp_path / "metrics.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in (1, 2, 3):
            for s in range(results.MAX_PLOTTED_SITES + 5):
                w.writerow({"round": r, "site": f"s{s:02d}", "phase": "evaluate",
                            "accuracy": 0.5 + 0.01 * s + 0.05 * r, "epsilon": 0.3 * r})
    with (tmp_path / "rounds.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["round", "accuracy"])
        w.writeheader()
        w.writerows({"round": r, "accuracy": 0.6 + 0.05 * r} for r in (1, 2, 3))
    png = results.plot_progress(tmp_path, "accuracy").read_bytes()
    seen = _colours(png)
    assert ImageColor.getrgb(charts.PALETTE[0]) in seen  # the median line
    assert (0, 0, 0) in seen  # the global line
    assert ImageColor.getrgb(charts.PALETTE[1]) not in seen  # no per-site lines
