"""Training's Pillow charts: panels side by side, each scaled to its own series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from siamese_omniglot.plots import _COLOURS, panel_chart


def rows_in_colour(image: Image.Image, colour: tuple[int, int, int], columns: slice) -> np.ndarray:
    """The y coordinates of the pixels of ``colour`` within ``columns``."""
    pixels = np.asarray(image.convert("RGB"))[:, columns].astype(int)
    return np.nonzero((np.abs(pixels - colour).sum(-1) == 0).any(1))[0]


def test_each_panel_has_its_own_scale(tmp_path: Path) -> None:
    """A cross-entropy near 7 and an accuracy near 0.8 both span their panel's full height."""
    panels = {"train": {"train loss": [7.0, 5.0, 4.0, 3.5]}, "val": {"val accuracy": [0.70, 0.75, 0.78, 0.80]}}
    path = panel_chart(panels, tmp_path / "chart.png", title="two panels", size=(720, 440))
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (720, 440))
        for n, columns in enumerate((slice(60, 340), slice(420, 700))):
            ys = rows_in_colour(image, _COLOURS[n], columns)
            plot_ys = ys[ys > 60]  # below the legend swatch
            assert plot_ys.min() < 70 and plot_ys.max() > 380  # from the top of the panel to its bottom
            other = rows_in_colour(image, _COLOURS[1 - n], columns)
            assert (other > 60).sum() == 0  # the other panel's line stays in its own panel


def test_one_panel_spans_the_chart_and_draws_a_series_ending_in_nan(tmp_path: Path) -> None:
    path = panel_chart({"": {"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, float("nan")]}}, tmp_path / "line.png", "one panel")
    with Image.open(path) as image:
        assert image.size == (720, 440)
        for colour in _COLOURS[:2]:
            assert len(rows_in_colour(image, colour, slice(60, 700))) > 100
