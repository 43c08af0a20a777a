"""One-shot classification trials: seeded N-way K-shot episodes and Lake et al.'s official 20 runs."""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import DataError
from .images import ImageSet, decode_image
from .pairs import seeded_generator


@dataclass(frozen=True)
class Episodes:
    """Trials as image indices: ``support[t, n, k]`` is shot k of candidate n; ``queries[t]`` belongs to
    candidate ``answers[t]``."""

    support: torch.Tensor  # int64 [T, N, K]
    queries: torch.Tensor  # int64 [T]
    answers: torch.Tensor  # int64 [T]

    def __len__(self) -> int:
        return int(self.queries.numel())


def sample_episodes(images: ImageSet, way: int, shot: int, trials: int, seed: int) -> Episodes:
    """Within-group N-way K-shot trials: all N candidates come from one group (alphabet).

    Each trial draws a group with at least ``way`` classes, ``way`` of its classes, ``shot`` support
    images per class and one query image of one class, distinct from that class's support images.
    """
    if way < 2 or shot < 1 or trials < 1:
        raise DataError(f"need way ≥ 2, shot ≥ 1 and trials ≥ 1 (got {way}-way {shot}-shot, {trials} trials)")
    group_start, group_count = images.group_ranges()
    class_start, class_count = images.class_ranges()
    eligible = torch.nonzero(group_count >= way).flatten()
    if eligible.numel() == 0:
        largest = int(group_count.max()) if group_count.numel() else 0  # an empty image set has no group
        raise DataError(f"no alphabet has {way} characters; choose a smaller --way (largest: {largest})")
    smallest = int(class_count.min())
    if smallest < shot + 1:
        hint = f"choose a smaller --shot (largest: {smallest - 1})" if smallest > 1 else "a class has one image"
        raise DataError(f"{shot}-shot trials need {shot + 1} images per class; some classes have fewer; {hint}")
    generator = seeded_generator(seed, 13)
    groups = eligible[torch.randint(eligible.numel(), (trials,), generator=generator)]
    # way distinct classes per trial: the first `way` of a random permutation of the group's classes
    ranks = torch.rand(trials, int(group_count.max()), generator=generator)
    ranks[torch.arange(ranks.shape[1]) >= group_count[groups, None]] = 2.0
    classes = group_start[groups, None] + ranks.argsort(dim=1)[:, :way]
    # shot + 1 distinct images per class: support images and one spare for the query
    draws = torch.rand(trials, way, int(class_count.max()), generator=generator)
    draws[torch.arange(draws.shape[2]) >= class_count[classes][..., None]] = 2.0
    picks = class_start[classes][..., None] + draws.argsort(dim=2)[..., : shot + 1]
    answers = torch.randint(way, (trials,), generator=generator)
    queries = picks[torch.arange(trials), answers, shot]
    return Episodes(support=picks[..., :shot], queries=queries, answers=answers)


def sample_drawer_runs(images: ImageSet, runs: int, seed: int, way: int = 20) -> Episodes:
    """Fresh runs in the design of Lake et al.'s official ones: 1-shot, within-alphabet, two drawers.

    Each run draws an alphabet with at least ``way`` characters, ``way`` of its characters and two
    drawers: one drew every support image, the other every query; each character is queried once, so
    a run is ``way`` trials. A drawer is an image's position within its class (Omniglot's ``_DD``
    suffix), which needs the same number of drawings in every class.
    """
    class_start, class_count = images.class_ranges()
    drawers = int(class_count.min())
    if drawers != int(class_count.max()) or drawers < 2:
        raise DataError("drawer runs need the same number (≥ 2) of drawings in every class, as in Omniglot")
    base = sample_episodes(images, way, 1, runs, seed)  # one trial per run: its classes are the run's classes
    classes = torch.searchsorted(class_start, base.support[..., 0].contiguous(), right=True) - 1  # [runs, way]
    generator = seeded_generator(seed, 17)
    pair = torch.rand(runs, drawers, generator=generator).argsort(1)[:, :2]  # support drawer, query drawer
    support = class_start[classes] + pair[:, :1]  # [runs, way]
    queries = class_start[classes] + pair[:, 1:]  # [runs, way]
    return run_episodes(support, queries, torch.arange(way).expand(runs, way))


def run_episodes(support: torch.Tensor, queries: torch.Tensor, answers: torch.Tensor) -> Episodes:
    """Runs in Lake et al.'s layout as 1-shot episodes: image indices ``support`` [R, W] and ``queries`` [R, W],
    ``answers`` [R, W] the support position of each query's class; each query is scored against its run's support.
    Trial ``r × W + i`` is query i of run r."""
    runs, way = support.shape
    return Episodes(
        support=support[:, None, :, None].expand(runs, queries.shape[1], way, 1).flatten(0, 1),
        queries=queries.flatten(),
        answers=answers.flatten(),
    )


@dataclass(frozen=True)
class LakeRuns:
    """Lake et al.'s official one-shot runs: per run, 20 training images and 20 test images."""

    training: torch.Tensor  # uint8 [R, 20, H, W]
    test: torch.Tensor  # uint8 [R, 20, H, W]
    answers: torch.Tensor  # int64 [R, 20]: index of the training image of each test image's class


_LABEL_LINE = re.compile(r"^(run\d+)/test/(item\d+)\.png\s+(run\d+)/training/(class\d+)\.png$")


def load_lake_runs(path: str | Path) -> LakeRuns:
    """Read ``all_runs.zip`` or a folder in its layout (``runNN/{training,test}/…``, ``class_labels.txt``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected Lake's all_runs.zip)")
    files = _read_tree(path)
    run_names = sorted({p.split("/")[0] for p in files if re.fullmatch(r"run\d+/class_labels\.txt", p)})
    if not run_names:
        raise DataError(f"{path}: no runNN/class_labels.txt found; is this Lake's all_runs.zip?")
    training, test, answers = [], [], []
    for run in run_names:
        text = files[f"{run}/class_labels.txt"].decode(errors="replace")  # a garbled byte fails the line check
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        train_names = sorted(p for p in files if p.startswith(f"{run}/training/") and p.endswith(".png"))
        index = {PurePosixPath(p).stem: i for i, p in enumerate(train_names)}
        tests, labels, listed = [], [], []
        for line in lines:
            match = _LABEL_LINE.match(line)
            if match is None or match.group(4) not in index or not match.group(1) == match.group(3) == run:
                raise DataError(f"{path}: {run}/class_labels.txt has an unexpected line: {line!r}")
            name = f"{run}/test/{match.group(2)}.png"
            if name not in files:
                raise DataError(f"{path}: {name} is listed but missing")
            tests.append(decode_image(files[name], name))
            labels.append(index[match.group(4)])
            listed.append(name)
        test_names = sorted(p for p in files if p.startswith(f"{run}/test/") and p.endswith(".png"))
        if sorted(listed) != test_names or sorted(labels) != list(range(len(train_names))):
            # a run is one test image of each of its classes: else some would be scored twice, others never
            raise DataError(f"{path}: {run}/class_labels.txt must name each test image once and each training "
                            "image once")
        training.append(np.stack([decode_image(files[p], p) for p in train_names]))
        test.append(np.stack(tests))
        answers.append(labels)
    if len({t.shape[0] for t in training} | {t.shape[0] for t in test}) != 1:
        raise DataError(f"{path}: runs differ in size; expected 20 training and 20 test images per run")
    return LakeRuns(
        training=torch.from_numpy(np.stack(training)),
        test=torch.from_numpy(np.stack(test)),
        answers=torch.tensor(answers, dtype=torch.int64),
    )


def _read_tree(path: Path) -> dict[str, bytes]:
    """All files under a folder or zip, keyed by POSIX path relative to the folder holding ``runNN/``."""
    if path.is_dir():
        entries = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        files = {name: entry.read_bytes() for name, entry in entries.items()}
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                files = {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
        except (zipfile.BadZipFile, OSError) as error:
            raise DataError(f"{path}: not a readable zip archive ({error})") from None
    # strip a common top folder such as all_runs/
    prefixes = {name.split("/")[0] for name in files}
    if len(prefixes) == 1 and not next(iter(prefixes)).startswith("run"):
        files = {name.split("/", 1)[1]: data for name, data in files.items() if "/" in name}
    return files
