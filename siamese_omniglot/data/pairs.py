"""Splits of an ImageSet and balanced same/different pair sampling, vectorised and seeded.

Validation holds out whole groups (Omniglot alphabets), so model selection and threshold calibration
only ever see characters that training never saw. Pair sampling draws every class with equal
probability (the reference never drew its last class), and negatives come from the same alphabet
with probability ``within_group`` (Lake's harder within-alphabet task) or from anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import ConfigError, DataError
from .images import ImageSet


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` whose stream depends only on ``keys`` (for example seed, epoch, rank).

    Drawing on the training device keeps sampling free of host-to-device copies (each of which would
    wait for the device's queue); a device kind without its own generators gets a CPU one.
    """
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key) + 1) % (2**63 - 1)
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:
        generator = torch.Generator()
    return generator.manual_seed(seed)


@dataclass(frozen=True)
class Pairs:
    """Index pairs into one ImageSet: ``first[i]`` and ``second[i]`` show the same class iff ``same[i]``."""

    first: torch.Tensor
    second: torch.Tensor
    same: torch.Tensor  # bool

    def __len__(self) -> int:
        return int(self.same.numel())

    def to(self, device: torch.device) -> Pairs:
        """The same pairs with their index tensors on ``device``."""
        return Pairs(self.first.to(device), self.second.to(device), self.same.to(device))


def split_validation(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split into (train, validation) by holding out a seeded ``fraction`` of groups.

    Groups are held out in a seeded order until the held-out ones hold two classes at least. A set with fewer
    than four groups (a ``<class>/<image>`` tree has one) holds out classes instead. Each side keeps at least
    two classes.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"validation fraction must be between 0 and 1, got {fraction}")
    generator = seeded_generator(seed, 7)
    num_groups = len(images.group_names)
    if num_groups >= 4:
        order = torch.randperm(num_groups, generator=generator)
        classes_in = torch.bincount(images.class_groups, minlength=num_groups)[order]
        count = max(1, round(fraction * num_groups))
        while count < num_groups and int(classes_in[:count].sum()) < 2:  # groups of one class: hold out another
            count += 1
        held = torch.isin(images.class_groups, order[:count])
    else:
        order = torch.randperm(images.num_classes, generator=generator)
        held = torch.zeros(images.num_classes, dtype=torch.bool)
        held[order[: max(2, round(fraction * images.num_classes))]] = True
    classes = torch.arange(images.num_classes)
    train, val = classes[~held], classes[held]
    if train.numel() < 2 or val.numel() < 2:
        raise DataError(
            f"{images.num_classes} classes are too few to hold out validation classes: training needs 2 classes to "
            f"train on and 2 to validate, and this split leaves {train.numel()} and {val.numel()}"
        )
    return images.subset_classes(train), images.subset_classes(val)


def split_images(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split into (train, validation) by holding out a seeded ``fraction`` of every class's images.

    This is the reference's protocol (a 90/10 split of ``images_background``): validation then measures
    new drawings of characters seen in training, not characters never seen. Every class keeps 2 images to
    train on and holds out 2, to make validation pairs of, at least, whatever the fraction.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"validation fraction must be between 0 and 1, got {fraction}")
    start, count = images.class_ranges()
    if int(count.min()) < 4:
        raise DataError("an image split needs at least 4 images per class (2 to train on, 2 to validate)")
    ranks = torch.rand(len(images), generator=seeded_generator(seed, 19))
    # rank of each image within its class (images of a class are contiguous)
    order = torch.argsort(images.labels * 2 + ranks, stable=True)
    position = torch.empty(len(images), dtype=torch.int64)
    position[order] = torch.arange(len(images)) - start[images.labels[order]]
    held = torch.minimum((count.float() * fraction).round().long().clamp(min=2), count - 2)
    val = position < held[images.labels]
    return images.subset_images(~val), images.subset_images(val)


class PairSampler:
    """Balanced same/different pairs over an ImageSet, deterministic in (seed, epoch, rank)."""

    def __init__(self, images: ImageSet, within_group: float = 0.5, device: torch.device | str = "cpu") -> None:
        if not 0 <= within_group <= 1:
            raise ConfigError(f"within-alphabet negative probability must be in [0, 1], got {within_group}")
        self.within_group = within_group
        starts, counts = images.class_ranges()
        small = int((counts < 2).sum())
        if images.num_classes < 2 or small:  # else "same" pairs of one image twice, or "different" ones of one class
            raise DataError(f"pairs need at least 2 classes of at least 2 images each; this set has "
                            f"{images.num_classes} classes, {small} of them with fewer than 2 images")
        self.class_start, self.class_count = starts.to(device), counts.to(device)
        self.group_start, self.group_count = (t.to(device) for t in images.group_ranges())
        self.class_groups = images.class_groups.to(device)
        self.num_classes = images.num_classes

    def sample(self, count: int, generator: torch.Generator) -> Pairs:
        """``count`` same pairs followed by ``count`` different pairs, on the sampler's device (drawn on the
        generator's)."""
        classes = torch.randint(self.num_classes, (count,), generator=generator, device=generator.device)
        classes = classes.to(self.class_start.device)
        a, b = self._two_images(classes, generator)
        other = self._other_classes(classes, generator)
        c = self._one_image(classes, generator)
        d = self._one_image(other, generator)
        same = torch.arange(2 * count, device=classes.device) < count
        return Pairs(torch.cat([a, c]), torch.cat([b, d]), same)

    def _rand(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(classes.shape, generator=generator, device=generator.device).to(classes.device)

    def _one_image(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        offsets = (self._rand(classes, generator) * self.class_count[classes]).long()
        return self.class_start[classes] + offsets

    def _two_images(self, classes: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.class_count[classes]
        first = (self._rand(classes, generator) * count).long()
        step = 1 + (self._rand(classes, generator) * (count - 1)).long()
        start = self.class_start[classes]
        return start + first, start + (first + step) % count

    def _other_classes(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        anywhere = (classes + 1 + (self._rand(classes, generator) * (self.num_classes - 1)).long())
        anywhere = anywhere % self.num_classes
        groups = self.class_groups[classes]
        size, start = self.group_count[groups], self.group_start[groups]
        step = 1 + (self._rand(classes, generator) * (size - 1).clamp(min=0)).long()
        same_group = start + (classes - start + step) % size
        use_group = (self._rand(classes, generator) < self.within_group) & (size > 1)
        return torch.where(use_group, same_group, anywhere)


class NegativeDesign(NamedTuple):
    """Where the second image of an evaluation pair of different characters comes from."""

    within_group: float  # probability that it is another character of the first image's group (Omniglot alphabet)
    label: str  # how reports name the design


# The designs of evaluation pairs by name (`siamese eval --negatives`): the first image's alphabet, the harder
# test, or any alphabet, as in the reference's pairs.
NEGATIVES = {"alphabet": NegativeDesign(1.0, "same alphabet"), "any": NegativeDesign(0.0, "any alphabet")}


def fixed_pairs(images: ImageSet, count: int, seed: int, within_group: float = 0.5) -> Pairs:
    """A fixed, balanced list of ``2 * count`` pairs (validation and evaluation)."""
    return PairSampler(images, within_group).sample(count, seeded_generator(seed, 11))
