"""Framing: each character scaled and centred in the picture a model sees (size and position normalisation).

Drawers place and size a character freely on the canvas; a model that sees the canvas as drawn must learn to
ignore where and how large each drawing is. Framing removes both before the model looks: the bounding box of
the ink is centred and its longer side scaled to a fixed fraction of the frame, as handwriting recognisers
have long normalised their input. The zoom is bounded (:data:`ZOOM_RANGE`), so that a dot or a dash is not
blown up to fill the frame.

Everything is batched tensor arithmetic and one ``grid_sample``: it runs on the model's device, under
autograd-free inference and in an exported ONNX graph alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import sampling_grid

ZOOM_RANGE = (0.5, 2.0)  # the least and most a character is scaled by
INK_LEVEL = 0.5  # a pixel with more ink than this belongs to the character's bounding box


def ink_boxes(ink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres (x, y) and longer sides of the ink's bounding boxes, in pixels, of ink images [N, 1, H, W].

    An image without ink gets the whole canvas as its box.
    """
    _, _, height, width = ink.shape
    mask = (ink[:, 0] > INK_LEVEL).to(ink.dtype)

    def extent(marks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:  # first and last inked index
        index = torch.arange(size, device=ink.device, dtype=ink.dtype)
        first = torch.where(marks > 0, index, torch.full_like(index, size)).amin(1)
        last = torch.where(marks > 0, index, torch.full_like(index, -1)).amax(1)
        empty = last < first
        first = torch.where(empty, torch.zeros_like(first), first)
        last = torch.where(empty, torch.full_like(last, size - 1), last)
        return first, last

    top, bottom = extent(mask.amax(2), height)
    left, right = extent(mask.amax(1), width)
    side = torch.maximum(bottom - top, right - left) + 1
    return (left + right) / 2, (top + bottom) / 2, side


def frame_ink(ink: torch.Tensor, fill: float) -> torch.Tensor:
    """Ink images [N, 1, H, W], each character's bounding box centred and its longer side scaled to ``fill`` of the
    canvas (within :data:`ZOOM_RANGE` of its drawn size); same shape.

    The framed canvas is sampled bilinearly at twice its resolution, then averaged down, so that a character made
    smaller stays smooth. Models area-resize the result to their input, as they would the canvas.
    """
    _, _, height, width = ink.shape
    canvas = max(height, width)
    centre_x, centre_y, side = ink_boxes(ink)
    zoom = (fill * canvas / side).clamp(*ZOOM_RANGE)
    frame = canvas / zoom  # canvas pixels the frame spans
    zeros = torch.zeros_like(zoom)
    # output → input in normalised coordinates (align_corners=False: pixel x sits at (2x + 1) / W − 1)
    theta = torch.stack(
        [
            torch.stack([frame / width, zeros, (2 * centre_x + 1) / width - 1], 1),
            torch.stack([zeros, frame / height, (2 * centre_y + 1) / height - 1], 1),
        ],
        1,
    )
    grid = sampling_grid(theta, None, 2 * height, 2 * width)
    return F.avg_pool2d(F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False), 2)
