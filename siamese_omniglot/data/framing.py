"""Framing: each character scaled and centred in the picture a model sees (size and position normalisation).

Drawers place and size a character freely on the canvas; a model that sees the canvas as drawn must learn to
ignore where and how large each drawing is. Framing removes both before the model looks: the bounding box of
the ink is centred and its longer side scaled to a fixed fraction of the frame, as handwriting recognisers
have long normalised their input. The zoom is bounded (:data:`ZOOM_RANGE`), so that a dot or a dash is not
blown up to fill the frame.

Framing, like the area resize after it, moves each row and each column of pixels on its own: a character is
scaled and shifted, never turned. Both are therefore one matrix per image for the rows and one for the columns,
and :func:`frame_ink` frames and resizes in two batched matrix products: on the model's device, under
autograd-free inference and in an exported ONNX graph alike. A model that does not frame area-resizes its input in
two matrix products too (:func:`resize_to`).
"""

from __future__ import annotations

import numpy as np
import torch

ZOOM_RANGE = (0.5, 2.0)  # the least and most a character is scaled by
INK_LEVEL = 0.5  # a pixel with more ink than this belongs to the character's bounding box


def area_matrix(in_px: int, out_px: int) -> torch.Tensor:
    """The [out_px, in_px] matrix ``A`` with ``A @ x @ A.T`` equal to area resizing of x (adaptive average pooling).

    Area resizing is separable: each output row averages a fixed range of input rows, and likewise for columns
    (and ONNX has no adaptive pooling to sizes that do not divide the input, such as 105 → 40).
    """
    matrix = np.zeros((out_px, in_px))  # built in numpy: a constant, not a chain of ops, in a traced graph
    for i in range(out_px):
        start, end = (i * in_px) // out_px, -((-(i + 1) * in_px) // out_px)  # the ranges of adaptive_avg_pool
        matrix[i, start:end] = 1 / (end - start)
    return torch.from_numpy(matrix).float()


def resize_to(images: torch.Tensor, size_px: int) -> torch.Tensor:
    """Area-resize [N, C, H, W] images to ``size_px``² (a no-op when already that size), as two matrix products."""
    height, width = images.shape[-2:]
    if (height, width) == (size_px, size_px):
        return images
    return area_matrix(height, size_px).to(images) @ images @ area_matrix(width, size_px).to(images).T


def ink_boxes(ink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres (x, y) and longer sides of the ink's bounding boxes, in pixels, of ink images [N, 1, H, W].

    An image without ink gets the whole canvas as its box.
    """
    _, _, height, width = ink.shape
    mask = ink[:, 0] > INK_LEVEL

    def extent(marks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:  # first and last inked index
        index = torch.arange(size, device=ink.device, dtype=ink.dtype)
        first = torch.where(marks, index, torch.full_like(index, size)).amin(1)
        last = torch.where(marks, index, torch.full_like(index, -1)).amax(1)
        empty = last < first
        first = torch.where(empty, torch.zeros_like(first), first)
        last = torch.where(empty, torch.full_like(last, size - 1), last)
        return first, last

    top, bottom = extent(mask.any(2), height)
    left, right = extent(mask.any(1), width)
    side = torch.maximum(bottom - top, right - left) + 1
    return (left + right) / 2, (top + bottom) / 2, side


def frame_ink(ink: torch.Tensor, fill: float, size_px: int | None = None) -> torch.Tensor:
    """Ink images [N, 1, H, W], each character's bounding box centred and its longer side scaled to ``fill`` of the
    canvas (within :data:`ZOOM_RANGE` of its drawn size), then area-resized to ``size_px``² (default: the canvas).

    The framed canvas is sampled bilinearly at twice its resolution (blank paper beyond the edges), then averaged
    down, so that a character made smaller stays smooth: what ``grid_sample`` at 2 × H × 2 × W, a 2 × 2 average
    pool and an area resize compute, as two matrix products per image.
    """
    _, _, height, width = ink.shape
    size = (height, width) if size_px is None else (size_px, size_px)
    centre_x, centre_y, side = ink_boxes(ink)
    zoom = (fill * max(height, width) / side).clamp(*ZOOM_RANGE)
    # the frame spans length / zoom canvas pixels along each axis: one zoom for both, so shapes keep their aspect
    rows = _axis_matrices(centre_y, height / zoom, height, size[0])
    columns = _axis_matrices(centre_x, width / zoom, width, size[1])
    return (rows @ ink[:, 0] @ columns.transpose(1, 2)).unsqueeze(1)


def _axis_matrices(centre: torch.Tensor, frame: torch.Tensor, length: int, size_px: int) -> torch.Tensor:
    """[N, size_px, length] matrices taking one axis of the canvas to the framed, resized axis."""
    samples = torch.arange(2 * length, device=centre.device, dtype=centre.dtype)
    # twice as many samples as pixels across the frame, centred on the box (align_corners=False coordinates)
    position = (samples + 0.5) / 2 * (frame / length)[:, None] + (centre + 0.5 - frame / 2)[:, None] - 0.5
    below = position.floor()
    offset = position - below
    # each framed pixel averages two samples, each sample two neighbouring canvas pixels: four weights per pixel
    index = torch.stack([below, below + 1], -1).reshape(-1, length, 4)  # [N, L, 4]; -1: any batch when traced
    weight = torch.stack([1 - offset, offset], -1).reshape(-1, length, 4) / 2
    inside = (index >= 0) & (index < length)  # blank paper beyond the canvas
    weight = torch.where(inside, weight, torch.zeros_like(weight))
    index = index.clamp(0, length - 1).long()
    pooled = torch.zeros(centre.shape[0], length, length, device=centre.device, dtype=centre.dtype)
    pooled.scatter_add_(2, index, weight)
    if size_px == length:
        return pooled
    return area_matrix(length, size_px).to(pooled) @ pooled
