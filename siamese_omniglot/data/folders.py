"""Image trees on disk: ``<group>/<class>/<image>`` or ``<class>/<image>``, decoded into an ImageSet."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import DataError
from .images import CANVAS_PX, IMAGE_SUFFIXES, ImageSet, decode_image, some_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageIndex:
    """Where each image of a tree is, grouped into classes and groups (names sorted)."""

    paths: tuple[str, ...]  # relative POSIX paths, sorted by group, class, file name
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    class_groups: tuple[int, ...]
    group_names: tuple[str, ...]


def visible_images(root: Path) -> list[PurePosixPath]:
    """Every image file (by its suffix) under ``root`` that no hidden file or folder holds, as paths relative to
    it, sorted.

    Symlinked folders are followed (each real folder once, so a link loop ends), as symlinked files are.

    Raises:
        DataError: a folder that cannot be listed (its classes would be missing), or an image name that is not valid
            UTF-8, which no cache or report could hold.
    """
    found: list[PurePosixPath] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, files in os.walk(root, onerror=_unlisted, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        relative = Path(folder).relative_to(root)
        for name in files:
            path = relative / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not (root / path).is_file():
                continue
            try:
                str(path).encode()
            except UnicodeEncodeError:
                raise DataError(f"{_shown(root / path)}: the file name is not valid UTF-8; rename it") from None
            found.append(PurePosixPath(path.as_posix()))
    return sorted(found)


def _unlisted(error: OSError) -> None:
    raise DataError(f"{_shown(error.filename)}: cannot list this folder ({error.strerror or error})")


def _shown(path: str | os.PathLike) -> str:
    """``path`` as a message shows it: bytes that are not UTF-8 as ``\\xNN``."""
    return os.fsencode(path).decode(errors="backslashreplace")


def index_paths(paths: Sequence[str], source: str) -> ImageIndex:
    """Group relative image paths into classes and groups.

    ``source`` names the tree in error messages. Paths must all be ``group/class/file`` or all
    ``class/file``; in the second form every class belongs to one group named after the source.
    """
    images = sorted(p for p in paths if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES)
    images = [p for p in images if not any(part.startswith(".") for part in PurePosixPath(p).parts)]
    if not images:
        raise DataError(f"{source}: no images found (expected <group>/<class>/<image> or <class>/<image>)")
    depths = {len(PurePosixPath(p).parts) for p in images}
    if depths == {1}:
        raise DataError(f"{source}: {len(images)} images and no class folders; expected <group>/<class>/<image> or "
                        "<class>/<image>, one folder per class")
    if depths not in ({2}, {3}):
        raise DataError(
            f"{source}: mixed or unexpected folder depths {sorted(depths)}; "
            "expected every image at <group>/<class>/<image> or every image at <class>/<image>"
        )
    classes: dict[tuple[str, str], list[str]] = {}
    tree = _tree_name(source)  # resolved once, not per image
    for path in images:
        parts = PurePosixPath(path).parts
        group, name = (parts[0], parts[1]) if len(parts) == 3 else (tree, parts[0])
        classes.setdefault((group, name), []).append(path)
    if len(classes) < 2:
        raise DataError(f"{source}: found {len(classes)} class; at least 2 classes are needed")
    small = [f"{g}/{c}" for (g, c), files in classes.items() if len(files) < 2]
    if small:
        shown = ", ".join(small[:5]) + (" …" if len(small) > 5 else "")
        raise DataError(f"{source}: {len(small)} class(es) have fewer than 2 images: {shown}")
    group_names = tuple(sorted({g for g, _ in classes}))
    group_ids = {g: i for i, g in enumerate(group_names)}
    ordered = sorted(classes)
    paths_out: list[str] = []
    labels: list[int] = []
    for label, key in enumerate(ordered):
        paths_out += classes[key]
        labels += [label] * len(classes[key])
    return ImageIndex(
        paths=tuple(paths_out),
        labels=tuple(labels),
        class_names=tuple(f"{g}/{c}" for g, c in ordered),
        class_groups=tuple(group_ids[g] for g, _ in ordered),
        group_names=group_names,
    )


def _tree_name(source: str) -> str:
    """The name of the one group of a ``<class>/<image>`` tree: its folder's own name, however it was spelt
    (``.``, ``..``, a trailing slash)."""
    return Path(source).resolve().name or "images"


def decode_index(
    index: ImageIndex,
    read: Callable[[str], bytes],
    progress: Callable[[int, int], None] | None = None,
    skip_bad: bool = False,
    source: str = "the data set",
) -> ImageSet:
    """Decode every image of ``index`` once, reading bytes with ``read(relative_path)``.

    Every image is tried before anything is refused, so one error lists all unreadable files (the first
    few and a count). With ``skip_bad`` they are left out with a warning instead, and so are classes
    left with fewer than 2 images. ``source`` names the tree in messages.
    """
    pixels = np.empty((len(index.paths), CANVAS_PX, CANVAS_PX), dtype=np.uint8)
    good = np.ones(len(index.paths), dtype=bool)
    problems: list[str] = []
    for i, path in enumerate(index.paths):
        try:
            pixels[i] = decode_image(read(path), path)
        except DataError as error:
            good[i] = False
            problems.append(str(error))
        if progress is not None and (i % 500 == 0 or i + 1 == len(index.paths)):
            progress(i + 1, len(index.paths))
    images = ImageSet(
        pixels=torch.from_numpy(pixels),
        labels=torch.tensor(index.labels, dtype=torch.int64),
        class_names=index.class_names,
        class_groups=torch.tensor(index.class_groups, dtype=torch.int64),
        group_names=index.group_names,
    )
    if not problems:
        return images
    listed = some_of(problems, separator="; ")
    if not skip_bad:
        raise DataError(
            f"{source}: {len(problems)} of {len(index.paths)} images cannot be read: {listed}; "
            "fix or remove them, or skip them with --skip-bad-images"
        )
    log.warning("%s: skipping %d unreadable images: %s", source, len(problems), listed)
    images = images.subset_images(torch.from_numpy(good))
    counts = torch.bincount(images.labels, minlength=images.num_classes)
    if bool((counts < 2).any()):
        lost = [images.class_names[i] for i in torch.nonzero(counts < 2).flatten().tolist()]
        log.warning("%s: leaving out %d classes left with fewer than 2 images: %s", source, len(lost),
                    some_of(lost))
    usable = torch.nonzero(counts >= 2).flatten()
    if usable.numel() < 2:
        raise DataError(f"{source}: fewer than 2 classes keep 2 readable images; nothing to train on")
    return images.subset_classes(usable)
