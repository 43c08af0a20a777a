"""Where the training images live while training: on the training device, or in host memory when they do not fit.

The images are turned into ink and resized (or framed, as the model frames them) once, to the size the trainer
distorts them at, and kept as uint8. On the
device, a batch is one indexing operation and costs no host synchronisation. A data set too large for
the device (more than half of its free memory) stays in host memory instead: each step then gathers its batch
there and copies it to the device, which costs one host synchronisation per step, the price of not fitting. The
set is not pinned: a gathered batch is a new tensor, so pinning the set would only hold host memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from . import devices
from .data.framing import resize_to
from .data.images import to_ink
from .errors import ConfigError

log = logging.getLogger(__name__)
PLACEMENTS = ("auto", "device", "host")
DEVICE_SHARE = 0.5  # the largest share of the device's free memory that the images may take


def staged_bytes(count: int, input_px: int) -> int:
    """Bytes that ``count`` staged images take at ``input_px`` (uint8, one channel)."""
    return count * input_px * input_px


def check_placement(placement: str) -> str:
    """``placement`` itself when it is one of :data:`PLACEMENTS`, else a ConfigError."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown --staging {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    return placement


def choose_placement(count: int, input_px: int, device: torch.device, placement: str = "auto") -> str:
    """``device`` or ``host``: where ``count`` images at ``input_px`` are kept (``auto`` asks the device)."""
    if check_placement(placement) != "auto":
        return placement
    free = devices.free_memory(device)
    needed = staged_bytes(count, input_px)
    if free is None or needed <= DEVICE_SHARE * free:
        return "device"
    log.warning(
        "the training images need %.2f GB at %d px but %s has %.2f GB free: keeping them in host memory and "
        "copying each batch (slower; --staging device keeps them on the device anyway)",
        needed / 1e9, input_px, device, free / 1e9,
    )
    return "host"


class StagedImages:
    """Training images as uint8 ink [N, 1, input_px, input_px], decoded and resized once.

    Args:
        pixels: uint8 pixels [N, H, W] as decoded (white background).
        input_px: the staged size: the model's input size, or a multiple of it where distortions are drawn finer.
        device: the training device; batches are returned there.
        placement: ``auto`` (the device when the images fit, else host memory), ``device`` or ``host``.
        to_input: ink images and a size → the images at that size, as the model sees them
            (``Embedding.to_input``; default: area resizing).
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        input_px: int,
        device: torch.device,
        placement: str = "auto",
        to_input: Callable[[torch.Tensor, int], torch.Tensor] = resize_to,
    ) -> None:
        self.device = device
        self.placement = choose_placement(len(pixels), input_px, device, placement)
        home = device if self.placement == "device" else torch.device("cpu")
        self.ink = _stage_ink(pixels, input_px, home, to_input)

    def __len__(self) -> int:
        return len(self.ink)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The images ``index`` (on any device) as uint8 on the training device."""
        if self.placement == "device":
            return self.ink[index.to(self.ink.device)]
        return self.ink[index.cpu()].to(self.device)


def _stage_ink(
    pixels: torch.Tensor,
    input_px: int,
    device: torch.device,
    to_input: Callable[[torch.Tensor, int], torch.Tensor],
    chunk: int = 4096,
) -> torch.Tensor:
    parts = []
    for block in pixels.split(chunk):
        ink = to_input(to_ink(block.to(device)), input_px)
        parts.append(ink.mul_(255).round_().to(torch.uint8))
    return torch.cat(parts)
