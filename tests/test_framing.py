"""Framing: characters centred and scaled to a share of the frame, whatever their place and size on the canvas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from siamese_omniglot.data import load_folder, to_ink
from siamese_omniglot.data.framing import ZOOM_RANGE, frame_ink, ink_boxes, resize_to


def box(size_px: int, top: int, left: int, height: int, width: int, line_px: int = 3) -> torch.Tensor:
    """An ink image [1, 1, size, size] holding the outline of a rectangle (strokes of ``line_px``)."""
    ink = torch.zeros(1, 1, size_px, size_px)
    ink[..., top : top + height, left : left + width] = 1
    ink[..., top + line_px : top + height - line_px, left + line_px : left + width - line_px] = 0
    return ink


def area_28(ink: torch.Tensor) -> torch.Tensor:
    """Ink images area-resized to 28 × 28, as the fast model sees them."""
    return F.interpolate(ink, size=(28, 28), mode="area")


def framed_by_grid_sample(ink: torch.Tensor, fill: float, size_px: int) -> torch.Tensor:
    """What framing means, written the slow way: the framed canvas sampled bilinearly at twice its resolution by
    ``grid_sample``, averaged down 2 × 2, then area-resized."""
    _, _, height, width = ink.shape
    centre_x, centre_y, side = ink_boxes(ink)
    frame = height / (fill * height / side).clamp(*ZOOM_RANGE)
    theta = torch.zeros(len(ink), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = frame / width, (2 * centre_x + 1) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = frame / height, (2 * centre_y + 1) / height - 1
    grid = F.affine_grid(theta, [len(ink), 1, 2 * height, 2 * width], align_corners=False)
    sampled = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.interpolate(F.avg_pool2d(sampled, 2), size=(size_px, size_px), mode="area")


@pytest.mark.parametrize(("shape", "out_px"), [((105, 105), 40), ((105, 105), 28), ((105, 105), 315), ((10, 7), 3)])
def test_resize_to_is_area_resizing(shape: tuple[int, int], out_px: int) -> None:
    images = torch.rand(3, 1, *shape)
    expected = F.interpolate(images, size=(out_px, out_px), mode="area")
    assert torch.allclose(resize_to(images, out_px), expected, atol=1e-6)


@pytest.mark.parametrize("size_px", [28, 84, 105])
def test_matrix_framing_is_bilinear_sampling_pooled_and_resized(mini_background: Path, size_px: int) -> None:
    ink = torch.cat([
        to_ink(load_folder(mini_background).pixels[:30]),
        box(105, top=0, left=0, height=20, width=105),  # a box at the edge: samples beyond the canvas are blank
        box(105, top=50, left=50, height=4, width=4),  # a dot: zoom at its bound
        torch.zeros(1, 1, 105, 105),
    ])
    assert torch.allclose(frame_ink(ink, 0.8, size_px), framed_by_grid_sample(ink, 0.8, size_px), atol=1e-4)


def test_ink_boxes_find_centre_and_longer_side() -> None:
    centre_x, centre_y, side = ink_boxes(box(105, top=10, left=20, height=30, width=50))
    assert (float(centre_x), float(centre_y), float(side)) == (44.5, 24.5, 50.0)


def test_blank_image_keeps_the_canvas() -> None:
    centre_x, centre_y, side = ink_boxes(torch.zeros(1, 1, 105, 105))
    assert (float(centre_x), float(centre_y), float(side)) == (52.0, 52.0, 105.0)
    assert frame_ink(torch.zeros(2, 1, 105, 105), 0.8).abs().max() == 0


def test_framed_character_is_centred_and_fills_its_share() -> None:
    framed = frame_ink(box(105, top=5, left=50, height=30, width=50), 0.8)  # zoom 1.68
    assert framed.shape == (1, 1, 105, 105)
    centre_x, centre_y, side = ink_boxes(framed)
    assert abs(float(side) - 0.8 * 105) <= 2
    assert abs(float(centre_x) - 52) <= 1 and abs(float(centre_y) - 52) <= 1


def test_place_and_size_on_the_canvas_no_longer_matter() -> None:
    small_corner = box(105, top=4, left=4, height=45, width=45, line_px=2)
    large_centre = box(105, top=8, left=8, height=90, width=90, line_px=4)  # twice the size, lines too
    framed = area_28(frame_ink(torch.cat([small_corner, large_centre]), 0.8))
    assert (framed[0] - framed[1]).abs().mean() < 0.02
    unframed = area_28(torch.cat([small_corner, large_centre]))
    assert (unframed[0] - unframed[1]).abs().mean() > 0.1  # the same two drawings, as the canvas shows them


def test_one_zoom_for_both_axes_of_a_wide_canvas() -> None:
    ink = torch.zeros(1, 1, 60, 120)
    ink[..., 20:40, 30:50] = 1  # a 20 × 20 square
    inked = frame_ink(ink, 0.8)[0, 0] > 0.5
    assert inked.shape == (60, 120)
    height, width = int(inked.any(1).sum()), int(inked.any(0).sum())
    assert height == width == 40  # zoomed twice (the bound) along both axes: still a square


def test_zoom_is_bounded() -> None:
    dot = box(105, top=50, left=50, height=4, width=4, line_px=2)  # 80% of 105 would be a 21-fold zoom
    _, _, side = ink_boxes(frame_ink(dot, 0.8))
    assert float(side) == pytest.approx(4 * ZOOM_RANGE[1], abs=1)


def test_real_characters_are_framed_alike(mini_background: Path) -> None:
    images = load_folder(mini_background)
    _, _, side = ink_boxes(frame_ink(to_ink(images.pixels[:200]), 0.8))
    _, _, canvas_side = ink_boxes(to_ink(images.pixels[:200]))
    fitted = (0.8 * 105 / canvas_side).clamp(*ZOOM_RANGE) * canvas_side  # the side each should reach
    assert ((side - fitted).abs() <= 2).float().mean() > 0.95
    assert side.std() < canvas_side.std() / 2  # sizes far more alike than on the canvas
