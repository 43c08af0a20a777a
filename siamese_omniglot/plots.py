"""Loss curves drawn with Pillow alone, so training writes ``epoch_loss.png`` without extra packages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

_COLOURS = ((200, 40, 40), (40, 90, 200), (30, 150, 60), (150, 80, 170))


def panel_chart(
    panels: dict[str, dict[str, Sequence[float]]],
    path: str | Path,
    title: str,
    x_label: str = "epoch",
    size: tuple[int, int] = (720, 440),
) -> Path:
    """Draw panels side by side, each with its own y scale and one line per named series; save as PNG.

    ``panels`` maps a panel's name (for the caller's reading only) to its series. Series of different
    units (a cross-entropy, a binary cross-entropy, an accuracy) go in separate panels, so that none is
    flattened by another's scale.
    """
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    panel_width = width / max(len(panels), 1)
    colour = 0
    for n, series in enumerate(panels.values()):
        box = (n * panel_width + 52, 52, (n + 1) * panel_width - 14, height - 42)
        _panel(draw, box, series, colour, x_label)
        colour += len(series)
    path = Path(path)
    image.save(path, format="PNG")
    return path


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    series: dict[str, Sequence[float]],
    first_colour: int,
    x_label: str,
) -> None:
    left, top, right, bottom = box
    values = [v for ys in series.values() for v in ys if math.isfinite(v)]
    length = max((len(ys) for ys in series.values()), default=0)
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    span_x = max(length - 1, 1)

    def point(i: int, v: float) -> tuple[float, float]:
        return left + (right - left) * (i / span_x), top + (bottom - top) * (1 - (v - low) / (high - low))

    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):
        v = low + (high - low) * k / 4
        _, y = point(0, v)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 48, y - 6), f"{v:.3g}", fill="black")
    step = max(1, math.ceil(length / max(2, int((right - left) // 22))))  # tick labels ≥ 22 px apart
    for i in range(length):
        if i % step == 0 or i == length - 1:
            x, _ = point(i, low)
            draw.line([x, bottom, x, bottom + 4], fill="black")
            draw.text((x - 4, bottom + 6), str(i + 1), fill="black")
    draw.text(((left + right) / 2 - 3 * len(x_label), bottom + 22), x_label, fill="black")
    legend_x = left
    for n, (label, ys) in enumerate(series.items()):
        colour = _COLOURS[(first_colour + n) % len(_COLOURS)]
        points = [point(i, v) for i, v in enumerate(ys) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.line([legend_x, top - 14, legend_x + 16, top - 14], fill=colour, width=3)
        draw.text((legend_x + 20, top - 20), label, fill="black")
        legend_x += 30 + draw.textlength(label)
