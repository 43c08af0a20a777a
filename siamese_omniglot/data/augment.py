"""Batched distortions for handwriting, run on whatever device holds the batch: Koch et al.'s (2015) affine
maps, optionally bent by a smooth random displacement field (Simard et al. 2003's elastic distortions).

No flips: a mirrored character is often another character.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ELASTIC_GRID = 4  # control points per side of the elastic displacement field: bends strokes, keeps them whole


def random_distortion(
    images: torch.Tensor,
    generator: torch.Generator,
    rotate_deg: float = 10.0,
    shear: float = 0.3,
    scale: tuple[float, float] = (0.8, 1.2),
    shift_px: float = 2.0,
    elastic: float = 0.0,
) -> torch.Tensor:
    """Distort ink images [N, 1, H, W]: one random affine map each (rotation, shear, scale, shift), optionally bent.

    Random numbers come from ``generator`` (best on the images' device: no host round trip); shifts are
    given in pixels of a 105-pixel canvas and scaled to the batch's size. ``elastic`` > 0 adds a smooth
    displacement to every sampling point: Gaussian noise of that standard deviation (in normalised
    coordinates, which span 2 across the image) on a coarse grid, upsampled bicubically.
    """
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)

    angle = uniform(-rotate_deg, rotate_deg) * (math.pi / 180)
    shear_x, shear_y = uniform(-shear, shear), uniform(-shear, shear)
    scale_x, scale_y = uniform(*scale), uniform(*scale)
    shift = 2 * shift_px / 105  # normalised coordinates span 2 across the image
    shift_x, shift_y = uniform(-shift, shift), uniform(-shift, shift)
    cos, sin = torch.cos(angle), torch.sin(angle)
    ones = torch.ones_like(angle)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shearing = torch.stack([torch.stack([ones, shear_x], 1), torch.stack([shear_y, ones], 1)], 1)
    scaling = torch.diag_embed(torch.stack([1 / scale_x, 1 / scale_y], 1))  # grid maps output → input
    linear = rotation @ shearing @ scaling
    theta = torch.cat([linear, torch.stack([shift_x, shift_y], 1).unsqueeze(2)], 2).to(images.device)
    coarse = None
    if elastic > 0:
        coarse = torch.randn(n, 2, ELASTIC_GRID, ELASTIC_GRID, generator=generator, device=generator.device)
        coarse = (coarse * elastic).to(images.device)
    grid = sampling_grid(theta, coarse, *images.shape[-2:]).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def sampling_grid(theta: torch.Tensor, coarse: torch.Tensor | None, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, height, width), align_corners=False)`` plus, when given, the displacement
    ``coarse`` [N, 2, g, g] upsampled bicubically (``align_corners=True``) to [N, height, width, 2].

    Both parts are separable, so they are built from per-row and per-column factors: a few times faster on the CPU
    than the two library calls at 84 × 84, where they took most of a distorted batch's time.
    """
    def centres(size: int) -> torch.Tensor:  # normalised pixel centres
        return (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1

    # grid[n, y, x, k] = theta[n, k, 0] · x + theta[n, k, 1] · y + theta[n, k, 2]
    along_x = centres(width)[None, :, None] * theta[:, None, :, 0] + theta[:, None, :, 2]  # [N, W, 2]
    along_y = centres(height)[None, :, None] * theta[:, None, :, 1]  # [N, H, 2]
    if coarse is None:
        return along_x[:, None] + along_y[:, :, None]
    rows, columns = _bicubic_matrix(height, coarse.shape[-2], coarse), _bicubic_matrix(width, coarse.shape[-1], coarse)
    grid = torch.einsum("yi,ncij,xj->nyxc", rows, coarse, columns)
    grid += along_x[:, None]
    grid += along_y[:, :, None]
    return grid


def _bicubic_matrix(size: int, points: int, like: torch.Tensor) -> torch.Tensor:
    """[size, points]: bicubic upsampling (``align_corners=True``) of ``points`` samples to ``size``, as a matrix."""
    basis = torch.eye(points, device=like.device, dtype=like.dtype).view(points, 1, 1, points)
    return F.interpolate(basis, size=(1, size), mode="bicubic", align_corners=True).view(points, size).T
