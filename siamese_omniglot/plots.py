"""Loss curves drawn with Pillow alone, so training writes ``epoch_loss.png`` without extra packages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

_COLOURS = ((200, 40, 40), (40, 90, 200), (30, 150, 60), (150, 80, 170))


def line_chart(
    series: dict[str, Sequence[float]], path: str | Path, title: str, x_label: str = "epoch", size=(720, 440)
) -> Path:
    """Draw one line per named series (x = 1, 2, …) with axes, ticks and a legend; save as PNG."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [v for ys in series.values() for v in ys if math.isfinite(v)]
    length = max((len(ys) for ys in series.values()), default=0)
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    span_x = max(length - 1, 1)

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * (i / span_x)
        y = top + (height - top - bottom) * (1 - (v - low) / (high - low))
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        v = low + (high - low) * k / 4
        _, y = point(0, v)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{v:.3g}", fill="black")
    for i in range(length):
        if length <= 12 or i % math.ceil(length / 12) == 0 or i == length - 1:
            x, _ = point(i, low)
            draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
            draw.text((x - 6, height - bottom + 6), str(i + 1), fill="black")
    draw.text((width / 2 - 20, height - 18), x_label, fill="black")
    draw.text((left, 12), title, fill="black")
    for n, (name, ys) in enumerate(series.items()):
        colour = _COLOURS[n % len(_COLOURS)]
        points = [point(i, v) for i, v in enumerate(ys) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend_y = top + 8 + 16 * n
        draw.line([width - right - 150, legend_y + 6, width - right - 130, legend_y + 6], fill=colour, width=3)
        draw.text((width - right - 124, legend_y), name, fill="black")
    path = Path(path)
    image.save(path)
    return path
