"""Decoded image collections and single-image decoding.

Every image, from Omniglot or a user's folder, is decoded once into an 8-bit grayscale array of
``CANVAS_PX`` × ``CANVAS_PX`` pixels (Omniglot's native 105 × 105). Models take "ink" images:
float tensors in [0, 1] where 1 is a stroke and 0 the paper, so zero padding is blank paper.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

log = logging.getLogger(__name__)

CANVAS_PX = 105
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 64_000_000  # far above any handwriting scan; refuses decompression bombs


@dataclass(frozen=True)
class ImageSet:
    """Images decoded once, grouped into classes, and classes into groups (Omniglot's alphabets).

    Images are sorted by class and classes by group, so each class and each group is a contiguous range.
    """

    pixels: torch.Tensor  # uint8 [N, H, W], 255 = paper
    labels: torch.Tensor  # int64 [N], class index of each image
    class_names: tuple[str, ...]
    class_groups: torch.Tensor  # int64 [C], group index of each class
    group_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset_classes(self, classes: torch.Tensor) -> ImageSet:
        """The images of the given classes (distinct indices, in any order), relabelled 0..len(classes)-1 in the
        order of their indices.

        Raises:
            DataError: a boolean mask (see :meth:`subset_images`), a repeated index, or one outside the classes.
        """
        classes = torch.as_tensor(classes)
        if classes.dtype == torch.bool:
            raise DataError("subset_classes takes class indices, not a mask: use mask.nonzero().flatten()")
        classes = classes.to(torch.int64).flatten().sort().values
        if classes.numel() and not 0 <= int(classes[0]) <= int(classes[-1]) < self.num_classes:
            raise DataError(f"class indices run from 0 to {self.num_classes - 1}, not {classes.tolist()[:5]}…")
        if bool((classes[1:] == classes[:-1]).any()):
            raise DataError("subset_classes takes each class once; an index is repeated")
        remap = torch.full((self.num_classes,), -1, dtype=torch.int64)
        remap[classes] = torch.arange(classes.numel())
        keep = remap[self.labels] >= 0
        groups_used = self.class_groups[classes].unique()
        group_remap = torch.full((len(self.group_names),), -1, dtype=torch.int64)
        group_remap[groups_used] = torch.arange(groups_used.numel())
        return ImageSet(
            pixels=self.pixels[keep],
            labels=remap[self.labels[keep]],
            class_names=tuple(self.class_names[i] for i in classes.tolist()),
            class_groups=group_remap[self.class_groups[classes]],
            group_names=tuple(self.group_names[i] for i in groups_used.tolist()),
        )

    def subset_images(self, keep: torch.Tensor) -> ImageSet:
        """The images where the boolean mask ``keep`` is set; every class keeps its label."""
        return ImageSet(self.pixels[keep], self.labels[keep], self.class_names, self.class_groups, self.group_names)

    def class_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First image index and image count of every class."""
        counts = torch.bincount(self.labels, minlength=self.num_classes)
        return torch.cumsum(counts, 0) - counts, counts

    def group_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First class index and class count of every group."""
        counts = torch.bincount(self.class_groups, minlength=len(self.group_names))
        return torch.cumsum(counts, 0) - counts, counts


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode one image file's bytes into a uint8 ``CANVAS_PX``² grayscale array (255 = paper).

    Any mode is accepted: transparency is composited on white (light strokes on a transparent canvas are read
    from their opacity), float images in 0–1 are scaled to 0–255, EXIF rotation is applied, and images of other
    sizes are fitted onto the canvas keeping their aspect ratio.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on odd files ("Corrupt EXIF data", …) are not ours
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only: a bomb is refused before it decodes
                if image.width * image.height > MAX_IMAGE_PIXELS:  # Pillow's own limit is a global of the process
                    raise Image.DecompressionBombError
                image.load()
                return image_to_canvas(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{name}: image too large (more than {MAX_IMAGE_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image (not a format Pillow recognises)") from None
    except Exception as error:  # Pillow's parsers raise many types on hostile bytes
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{name}: not a readable image ({reason})") from None


def image_to_canvas(image: Image.Image) -> np.ndarray:
    """A PIL image, of any mode, as :func:`decode_image` makes a file's: EXIF rotation applied, gray on white paper,
    fitted onto the canvas."""
    return fit_to_canvas(_to_gray(ImageOps.exif_transpose(image)))


def fit_to_canvas(image: Image.Image | np.ndarray) -> np.ndarray:
    """A grayscale image (PIL or uint8 array, 255 = paper) padded to square on white and resized to the canvas."""
    gray = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    if gray.size != (CANVAS_PX, CANVAS_PX):
        # ImageOps.pad, except that a side never shrinks to 0 pixels (a 1 × 5000 line stays a line)
        scale = CANVAS_PX / max(gray.size)
        width, height = (max(1, min(CANVAS_PX, round(side * scale))) for side in gray.size)
        canvas = Image.new("L", (CANVAS_PX, CANVAS_PX), 255)
        corner = (round((CANVAS_PX - width) / 2), round((CANVAS_PX - height) / 2))  # centred as ImageOps.pad does
        canvas.paste(gray.resize((width, height), Image.BILINEAR), corner)
        gray = canvas
    return np.asarray(gray, dtype=np.uint8)


def _to_gray(image: Image.Image) -> Image.Image:
    if image.mode in ("1", "L"):
        return image.convert("L")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # levels up to 255 are 8-bit ones in a wider container, as in integer arrays; others are 16-bit (Pillow < 10.3
        # opens 16-bit grayscale PNGs as mode I), and wider ones are scaled by their maximum
        image = image.convert("I")  # point() maps no byte-ordered 16-bit mode (I;16B, I;16L)
        top = image.getextrema()[1]
        high = 255 if top <= 255 else max(65535, top)
        return image.point(lambda value: value * (255 / high)).convert("L")
    if image.mode == "F":
        if not np.isfinite(np.asarray(image)).all():  # a NaN passes every comparison: read as 0–255, then black
            raise DataError("its pixels hold NaN or infinity")
        # float images mostly hold 0–1 (numpy, scientific tools); others are taken as gray levels 0–255
        return (image.point(lambda value: value * 255) if image.getextrema()[1] <= 1 else image).convert("L")
    rgba = image.convert("RGBA")
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    gray = Image.alpha_composite(paper, rgba).convert("L")
    alpha_low, alpha_high = rgba.getchannel("A").getextrema()
    if gray.getextrema()[0] >= 128 and alpha_low < 128 <= alpha_high:
        # light strokes on a transparent canvas would vanish on white paper: the opaque pixels are the strokes
        return ImageOps.invert(rgba.getchannel("A"))
    return gray


MOSTLY_INK = 0.5  # a canvas darker than this on average is not dark strokes on light paper (Omniglot's: ≤ 0.22)


def warn_of_dark_images(pixels: torch.Tensor, names: Sequence[str]) -> None:
    """One warning naming the canvases [N, H, W] (255 = paper) more than half dark: light strokes on a dark ground,
    or a dark background, which the network reads as ink."""
    ink = 1 - pixels.flatten(1).float().mean(dim=1) / 255
    dark = [f"{names[i]} ({float(ink[i]):.0%})" for i in torch.nonzero(ink > MOSTLY_INK).flatten().tolist()]
    if dark:
        log.warning("mostly dark, so read as mostly ink: %s; the network reads strokes as dark on light paper: "
                    "invert light-on-dark images, brighten dark backgrounds", some_of(dark))


def some_of(items: Sequence[str], shown: int = 5, separator: str = ", ") -> str:
    """The first ``shown`` items of a message's list, and how many more."""
    more = len(items) - shown
    return separator.join(items[:shown]) + (f"{separator}… and {more} more" if more > 0 else "")


def read_image(path: str | Path) -> np.ndarray:
    """Read and decode one image file (see :func:`decode_image`)."""
    path = Path(path)
    if not path.exists():
        broken = path.is_symlink()  # to a missing file, or to itself through a loop
        raise DataError(f"{path}: {'a symbolic link to no file' if broken else 'no such file'}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    if not data:
        raise DataError(f"{path}: empty file")
    return decode_image(data, str(path))


def to_ink(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [N, H, W] (255 = paper) → float ink [N, 1, H, W] in [0, 1] (1 = stroke)."""
    return (255 - pixels.float()).div(255).unsqueeze(1)  # out of place, so that ONNX export traces it too
