"""Property-based tests (hypothesis) of the pair sampler and the validation split, over generated data sets.

Every image of a generated set carries its own identity in its pixels (class, group, drawer), so a test
can tell from the pixels alone which class a sampled pair shows, whatever relabelling a split did.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from siamese_omniglot.config import preset
from siamese_omniglot.data import ImageSet, PairSampler, load_folder, seeded_generator, split_validation
from siamese_omniglot.errors import DataError
from siamese_omniglot.train import Trainer

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)
CPU = torch.device("cpu")


@st.composite
def image_sets(draw: st.DrawFn, min_classes: int = 2) -> ImageSet:
    """An ImageSet of 1–6 groups, 1–5 classes per group and 2–6 images per class.

    Pixel [0, 0] holds the class, [0, 1] the group, [0, 2] the image's place in its class.
    """
    classes_per_group = draw(st.lists(st.integers(1, 5), min_size=1, max_size=6))
    assume(sum(classes_per_group) >= min_classes)
    class_groups = [g for g, n in enumerate(classes_per_group) for _ in range(n)]
    sizes = draw(st.lists(st.integers(2, 6), min_size=len(class_groups), max_size=len(class_groups)))
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    pixels = torch.full((int(labels.numel()), 3, 3), 255, dtype=torch.uint8)
    pixels[:, 0, 0] = labels.to(torch.uint8)
    pixels[:, 0, 1] = torch.tensor(class_groups)[labels].to(torch.uint8)
    pixels[:, 0, 2] = torch.cat([torch.arange(n) for n in sizes]).to(torch.uint8)
    return ImageSet(
        pixels=pixels,
        labels=labels,
        class_names=tuple(f"g{g}/c{c}" for c, g in enumerate(class_groups)),
        class_groups=torch.tensor(class_groups),
        group_names=tuple(f"g{g}" for g in range(len(classes_per_group))),
    )


def original_class(images: ImageSet, index: torch.Tensor) -> torch.Tensor:
    """The class (in the generated set) that images ``index`` of ``images`` show, read from their pixels."""
    return images.pixels[index, 0, 0].long()


@PROPERTY_SETTINGS
@given(images=image_sets(), count=st.integers(1, 200), seed=st.integers(0, 2**31), within=st.floats(0, 1))
def test_pairs_are_balanced_and_correct(images: ImageSet, count: int, seed: int, within: float) -> None:
    pairs = PairSampler(images, within).sample(count, seeded_generator(seed))
    assert len(pairs) == 2 * count
    assert pairs.same[:count].all() and not pairs.same[count:].any()  # exactly half and half
    assert int(pairs.first.min()) >= 0 and int(max(pairs.first.max(), pairs.second.max())) < len(images)
    first, second = original_class(images, pairs.first), original_class(images, pairs.second)
    assert torch.equal(first == second, pairs.same)  # same pairs share a class, different pairs never do
    assert bool((pairs.first[:count] != pairs.second[:count]).all())  # two different drawings, never one twice
    # within-group negatives stay in their group whenever the group has another class
    if within == 1.0:
        groups = images.class_groups
        lone = torch.bincount(groups, minlength=len(images.group_names))[groups[first[count:]]] == 1
        inside = groups[first[count:]] == groups[second[count:]]
        assert bool((inside | lone).all())


@PROPERTY_SETTINGS
@given(images=image_sets(), seed=st.integers(0, 2**31), within=st.floats(0, 1))
def test_every_class_and_image_is_reachable(images: ImageSet, seed: int, within: float) -> None:
    count = 150 * len(images)  # a class is missed with probability below 1e-20
    pairs = PairSampler(images, within).sample(count, seeded_generator(seed))
    classes = torch.arange(images.num_classes)
    assert torch.equal(original_class(images, pairs.first[:count]).unique(), classes)  # in same pairs
    negatives = torch.cat([pairs.first[count:], pairs.second[count:]])
    assert torch.equal(original_class(images, negatives).unique(), classes)  # and in different pairs
    assert torch.equal(torch.cat([pairs.first, pairs.second]).unique(), torch.arange(len(images)))


@PROPERTY_SETTINGS
@given(images=image_sets(min_classes=4), seed=st.integers(0, 2**31), fraction=st.floats(0.05, 0.6))
def test_no_validation_class_is_ever_in_a_training_pair(images: ImageSet, seed: int, fraction: float) -> None:
    try:
        train, val = split_validation(images, fraction, seed)
    except DataError:
        assume(False)  # too few classes on one side: refused, never silently shared
    val_classes = set(original_class(val, torch.arange(len(val))).tolist())
    train_classes = set(original_class(train, torch.arange(len(train))).tolist())
    assert val_classes and train_classes and not val_classes & train_classes
    assert val_classes | train_classes == set(range(images.num_classes))
    if len(images.group_names) >= 4:  # whole alphabets are held out
        val_groups = set(val.pixels[:, 0, 1].tolist())
        assert not val_groups & set(train.pixels[:, 0, 1].tolist())
    pairs = PairSampler(train, 0.5).sample(100, seeded_generator(seed, 1))
    drawn = original_class(train, torch.cat([pairs.first, pairs.second]))
    assert not set(drawn.tolist()) & val_classes
    # the split is a function of the seed alone
    again_train, again_val = split_validation(images, fraction, seed)
    assert torch.equal(again_train.pixels, train.pixels) and torch.equal(again_val.pixels, val.pixels)


@PROPERTY_SETTINGS
@given(
    images=image_sets(),
    keys=st.tuples(st.integers(0, 2**20), st.integers(0, 10_000), st.integers(0, 63)),
    other=st.tuples(st.integers(0, 2**20), st.integers(0, 10_000), st.integers(0, 63)),
)
def test_pairs_are_a_function_of_seed_epoch_and_rank(
    images: ImageSet, keys: tuple[int, int, int], other: tuple[int, int, int]
) -> None:
    sampler = PairSampler(images, 0.5)
    a = sampler.sample(64, seeded_generator(*keys))
    b = PairSampler(images, 0.5).sample(64, seeded_generator(*keys))  # a new sampler, a new generator
    assert torch.equal(a.first, b.first) and torch.equal(a.second, b.second) and torch.equal(a.same, b.same)
    # another seed, epoch or rank draws another stream (the keys map to distinct generator seeds)
    if other != keys:
        assert seeded_generator(*other).initial_seed() != seeded_generator(*keys).initial_seed()
        if len(images) >= 6:
            c = sampler.sample(64, seeded_generator(*other))
            assert not (torch.equal(a.first, c.first) and torch.equal(a.second, c.second))


def test_ranks_draw_different_pairs_and_epochs_differ() -> None:
    """The streams a 4-process job uses in 3 epochs: all 12 distinct."""
    keys = [(0, epoch, rank) for epoch in range(3) for rank in range(4)]
    seeds = {seeded_generator(*k).initial_seed() for k in keys}
    assert len(seeds) == len(keys)


def test_trainer_draws_only_training_classes(mini_background: Path, mini_evaluation: Path) -> None:
    """The real Trainer: its staged images and pairs hold no validation and no evaluation character."""
    images = load_folder(mini_background)
    evaluation = load_folder(mini_evaluation)
    trainer = Trainer(preset("fast", objective="pair", batch_size=64, val_pairs=50), images, "unused", CPU)
    train_names, val_names = set(trainer.train_set.class_names), set(trainer.val_set.class_names)
    assert not train_names & val_names and not train_names & set(evaluation.class_names)
    assert len(trainer.staged) == len(trainer.train_set) < len(images)
    for epoch in range(3):
        pairs = trainer.sampler.sample(500, seeded_generator(0, epoch, 0))
        drawn = trainer.train_set.labels[torch.cat([pairs.first, pairs.second])]
        assert {trainer.train_set.class_names[i] for i in drawn.unique().tolist()} <= train_names
    # the pixels the trainer stages are those of the training classes, in order
    assert torch.equal(trainer.train_set.pixels, images.subset_classes(
        torch.tensor([images.class_names.index(n) for n in trainer.train_set.class_names])).pixels)

