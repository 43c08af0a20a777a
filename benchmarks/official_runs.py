"""Official runs against fresh runs: where Lake et al.'s 20 runs sit among runs of their own design.

Finds every image of ``all_runs.zip`` in ``images_evaluation`` (by its pixels), reads the runs' design off
them (which alphabets, which drawers) and scores one checkpoint four ways:

1. the official runs (400 trials), with an interval from resampling their character sets: the trials of a
   run share one alphabet, one character set and one pair of drawers, and runs may share character sets;
2. the same character sets with every other ordered pair of the drawers the official runs use (not the run's
   own pair);
3. fresh runs of the same design: as many ways, the official runs' alphabets and drawers, new characters and
   drawer pairs;
4. fresh runs over all evaluation alphabets and drawers (the ``drawer runs`` of ``benchmarks/accuracy.py``).

Fresh runs get intervals from resampling whole runs.

    python benchmarks/official_runs.py --data datasets --runs datasets/all_runs.zip
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from results_table import insert_row

import siamese_omniglot as so
from siamese_omniglot.data import Episodes, run_episodes, sample_drawer_runs
from siamese_omniglot.evaluate import embed_pixels, episode_logits
from siamese_omniglot.models import SiameseNetwork
from siamese_omniglot.verify import default_checkpoint

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


@dataclass(frozen=True)
class RunDesign:
    """The official runs located in an ImageSet: image indices and what they were drawn from."""

    training: torch.Tensor  # int64 [R, W]: image index of each run's training (support) images
    test: torch.Tensor  # int64 [R, W]: image index of each run's test (query) images
    answers: torch.Tensor  # int64 [R, W]: position in ``training`` of each test image's character
    pairs: torch.Tensor  # int64 [R, 2]: each run's support and query drawer (0-based position within a class)
    character_sets: torch.Tensor  # int64 [R]: runs with the same characters share a number
    alphabets: tuple[str, ...]  # the groups the runs draw from, sorted
    drawers: tuple[int, ...]  # the drawers the runs use, sorted


def _digest(image: torch.Tensor) -> bytes:
    return hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest()


def drawer_of(images: so.ImageSet, index: torch.Tensor) -> torch.Tensor:
    """The drawer of images ``index``: each one's 0-based position within its class (Omniglot's ``_DD`` − 1)."""
    class_start, _ = images.class_ranges()
    return index - class_start[images.labels[index]]


def locate_runs(runs: so.LakeRuns, images: so.ImageSet) -> RunDesign:
    """Find each run image among ``images`` by identical pixels; stops with a message when one is missing."""
    index = {_digest(image): i for i, image in enumerate(images.pixels)}

    def find(batch: torch.Tensor) -> torch.Tensor:
        found = [index.get(_digest(image)) for image in batch.flatten(0, 1)]
        if None in found:
            raise SystemExit(f"{found.count(None)} run images are not in the evaluation set: is it Omniglot's?")
        return torch.tensor(found, dtype=torch.int64).view(batch.shape[:2])

    training, test = find(runs.training), find(runs.test)
    both = torch.cat([training, test], 1)
    drawers = drawer_of(images, both)
    support, query = drawers.split(training.shape[1], 1)
    if (support != support[:, :1]).any() or (query != query[:, :1]).any():  # the other-drawers figures assume it
        raise SystemExit("a run's training or test images come from several drawers: not Lake et al.'s design")
    groups = images.class_groups[images.labels[both]]
    characters = images.labels[training].sort(1).values
    return RunDesign(
        training=training,
        test=test,
        answers=runs.answers,
        pairs=torch.stack([support[:, 0], query[:, 0]], 1),
        character_sets=torch.unique(characters, dim=0, return_inverse=True)[1],
        alphabets=tuple(sorted({images.group_names[g] for g in groups.unique().tolist()})),
        drawers=tuple(drawers.unique().tolist()),
    )


def run_bootstrap(
    correct: torch.Tensor, clusters: torch.Tensor | None = None, samples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of the accuracy of trials ``correct`` [R, W] when whole clusters of runs are resampled.

    ``clusters`` [R] numbers the runs that are not independent of each other alike (default: each run alone).
    """
    clusters = torch.arange(len(correct)) if clusters is None else clusters
    count = int(clusters.max()) + 1
    hits = torch.zeros(count).index_add_(0, clusters, correct.float().sum(1))
    trials = torch.zeros(count).index_add_(0, clusters, torch.full((len(correct),), float(correct.shape[1])))
    picks = torch.randint(count, (samples, count), generator=torch.Generator().manual_seed(seed))
    means = hits[picks].sum(1) / trials[picks].sum(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975])).tolist()
    return low, high


def run_hits(model: SiameseNetwork, embeddings: torch.Tensor, episodes: Episodes, runs: int) -> torch.Tensor:
    """Hits [R, W] of ``runs`` runs laid out as :func:`run_episodes` lays them out."""
    return (episode_logits(model, embeddings, episodes).argmax(1) == episodes.answers).view(runs, -1)


def other_drawer_pairs(
    model: SiameseNetwork, embeddings: torch.Tensor, images: so.ImageSet, design: RunDesign
) -> torch.Tensor:
    """Accuracy of each official run's characters under each ordered pair of the design's drawers other than the
    run's own: [R, P], NaN where the pair is the run's."""
    class_start, _ = images.class_ranges()
    first = class_start[images.labels[design.training]]  # [R, W]: each run's characters, in training order
    answers = torch.arange(first.shape[1]).expand_as(first)
    pairs = [(a, b) for a in design.drawers for b in design.drawers if a != b]
    hits = [run_hits(model, embeddings, run_episodes(first + a, first + b, answers), len(first)) for a, b in pairs]
    accuracy = torch.stack([h.float().mean(1) for h in hits], 1)
    own = (torch.tensor(pairs)[None] == design.pairs[:, None]).all(-1)  # [R, P]
    return accuracy.masked_fill(own, torch.nan)


def design_subset(images: so.ImageSet, design: RunDesign) -> so.ImageSet:
    """The images of the design's alphabets drawn by the design's drawers."""
    chosen = [g for g, name in enumerate(images.group_names) if name in design.alphabets]
    classes = torch.nonzero(torch.isin(images.class_groups, torch.tensor(chosen))).flatten()
    subset = images.subset_classes(classes)
    drawer = drawer_of(subset, torch.arange(len(subset)))
    return subset.subset_images(torch.isin(drawer, torch.tensor(design.drawers)))


def fresh_runs(
    model: SiameseNetwork, images: so.ImageSet, device: torch.device, runs: int, seed: int, way: int
) -> dict:
    """Accuracy on ``runs`` fresh drawer runs of ``images``, with an interval from resampling whole runs."""
    embeddings = embed_pixels(model, images.pixels, device)
    correct = run_hits(model, embeddings, sample_drawer_runs(images, runs, seed, way), runs)
    low, high = run_bootstrap(correct, seed=seed)
    return {"accuracy": float(correct.float().mean()), "run_ci": [low, high], "trials": correct.numel()}


def compare(
    checkpoint: Path, evaluation: so.ImageSet, runs: so.LakeRuns, device: torch.device, seed: int, fresh: int
) -> dict:
    """The four accuracies of one checkpoint, and the official runs' design."""
    model = so.Verifier.from_checkpoint(checkpoint, device).model
    design = locate_runs(runs, evaluation)
    embeddings = embed_pixels(model, evaluation.pixels, device)
    official = run_hits(model, embeddings, run_episodes(design.training, design.test, design.answers), len(design.test))
    way = design.training.shape[1]
    return {
        "alphabets": list(design.alphabets),
        "drawers": [d + 1 for d in design.drawers],  # as Omniglot numbers them (the _DD of the file names)
        "character_sets": int(design.character_sets.max()) + 1,
        "runs": len(design.training),
        "official": {
            "accuracy": int(official.sum()) / official.numel(),
            "run_ci": list(run_bootstrap(official, design.character_sets, seed=seed)),
            "trials": official.numel(),
        },
        "other_drawer_pairs": float(other_drawer_pairs(model, embeddings, evaluation, design).nanmean()),
        "fresh_same_design": fresh_runs(model, design_subset(evaluation, design), device, fresh, seed, way),
        "fresh_all": fresh_runs(model, evaluation, device, fresh, seed, way),
    }


def results_row(report: dict) -> str:
    """One row of the official-versus-fresh table of docs/results.md."""

    def interval(result: dict) -> str:
        return f"{result['accuracy']:.1%} ({result['run_ci'][0]:.1%}–{result['run_ci'][1]:.1%})"

    return (
        f"| {report['date']} | {report['checkpoint']} | {report['device']} | **{interval(report['official'])}** "
        f"| {report['other_drawer_pairs']:.1%} | {interval(report['fresh_same_design'])} "
        f"| {interval(report['fresh_all'])} | `{report['command']}` |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint to score (default: the bundled model)")
    parser.add_argument("--data", default=None, help="Omniglot data root (default: $SIAMESE_DATA or ./datasets)")
    parser.add_argument("--runs", required=True, help="Lake's all_runs.zip")
    parser.add_argument("--device", default="cpu", help="device to embed on (auto, cpu, cuda, sdaa…)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh-runs", type=int, default=100, help="fresh runs per fresh protocol")
    parser.add_argument("--results", default=str(RESULTS), help="Markdown file to append the row to ('' = none)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = parser.parse_args()

    device = so.resolve_device(args.device)
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    evaluation = so.load_evaluation_set(args.data)
    runs = so.load_lake_runs(args.runs)
    report = {
        "date": date.today().isoformat(),
        "checkpoint": f"`{args.checkpoint}`" if args.checkpoint else "bundled `fast`",
        "device": f"{device} ({platform.machine()}, torch {torch.__version__})",
        "command": "python " + shlex.join(sys.argv),
        **compare(checkpoint, evaluation, runs, device, args.seed, args.fresh_runs),
    }
    if args.results:
        insert_row(args.results, "## Official runs and fresh runs", results_row(report))
    print(json.dumps(report, indent=2) if args.json else results_row(report))


if __name__ == "__main__":
    main()
