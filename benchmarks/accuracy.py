"""Accuracy benchmark: train a preset from scratch with a fixed seed, evaluate it, append a row to the results.

Every protocol runs on ``images_evaluation`` (alphabets never seen in training) or on Lake et al.'s
official runs; model selection and calibration used held-out background alphabets only. Checkpoints
saved after 5 and 10 minutes of training are scored on the official runs too (reporting only).

    python benchmarks/accuracy.py --preset fast --data datasets --runs datasets/all_runs.zip
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch
from official_runs import run_bootstrap, run_hits
from results_table import insert_row

import siamese_omniglot as so
from siamese_omniglot.data import NEGATIVES, fixed_pairs, sample_drawer_runs
from siamese_omniglot.data.omniglot import looks_like_omniglot
from siamese_omniglot.data.roots import data_root
from siamese_omniglot.evaluate import OneShotResult, embed_pixels, pair_logits

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
SNAPSHOT_MINUTES = (5, 10)
DRAWER_RUNS = 500  # 10,000 trials: the runs' accuracies spread 11.5 points, so their mean 0.5


def evaluate_checkpoint(
    checkpoint: Path,
    evaluation: so.ImageSet,
    runs: so.LakeRuns,
    device: torch.device,
    seed: int,
    trials: int,
    ways: tuple[int, int] = (20, 5),
    drawer_runs: int = DRAWER_RUNS,
) -> dict:
    """Every protocol of the results table for one checkpoint (``ways``: the two N-way settings; ``seed``: the
    sampled trials', pairs' and drawer runs'). Drawer runs get an interval from resampling whole runs, whose trials
    share an alphabet, characters and drawers; the others a Wilson interval over independent trials."""
    verifier = so.Verifier.from_checkpoint(checkpoint, device)
    model = verifier.model
    embeddings = embed_pixels(model, evaluation.pixels, device)

    def verification(negatives: str) -> dict:
        design = NEGATIVES[negatives]
        pairs = fixed_pairs(evaluation, trials, seed, within_group=design.within_group)
        metrics = so.pair_metrics(pair_logits(model, embeddings, pairs), pairs.same, verifier.threshold)
        return metrics.to_dict() | {"negatives": design.label}

    hits = run_hits(model, embeddings, sample_drawer_runs(evaluation, drawer_runs, seed, way=ways[0]), drawer_runs)
    low, high = run_bootstrap(hits)
    return {
        "lake_runs": so.lake_runs_accuracy(model, runs, device).to_dict(),
        "drawer_runs": OneShotResult("drawer runs", ways[0], 1, hits.numel(), hits.float().mean().item(), low, high)
        .to_dict() | {"runs": drawer_runs, "interval": "runs resampled"},
        **{
            f"way{way}": so.one_shot_accuracy(model, embeddings, so.sample_episodes(evaluation, way, 1, trials, seed))
            .to_dict()
            for way in ways
        },
        "verification": verification("alphabet"),
        "verification_any": verification("any"),
    }


def _percent(result: dict) -> str:
    return f"{result['accuracy']:.1%} ({result['ci_low']:.1%}–{result['ci_high']:.1%})"


def results_row(report: dict) -> str:
    """One Markdown table row of the results page; a run on the reference's image split says so."""
    snapshots = ", ".join(f"{m} min: {a:.1%}" for m, a in report["snapshots"].items()) or "—"
    same, anywhere = report["verification"], report["verification_any"]
    auc = (f"{same['roc_auc']:.4f} / {same['eer']:.1%} "
           f"(any alphabet: {anywhere['roc_auc']:.4f} / {anywhere['eer']:.1%})")
    preset = f"`{report['preset']}`" + (", 90/10 image split" if "reference_protocol" in report else "")
    return (
        f"| {report['date']} | {preset} | {report['device']} | {report['train_minutes']:.1f} min "
        f"| **{report['lake_runs']['accuracy']:.1%}** | {_percent(report['drawer_runs'])} "
        f"| {_percent(report['way20'])} | {_percent(report['way5'])} | {auc} "
        f"| {snapshots} | `{report['command']}` |"
    )


def reference_row(report: dict) -> str:
    """One row of the reference-protocol table: pair accuracy on new drawings of the training characters."""
    ref = report["reference_protocol"]
    return (
        f"| {report['date']} | `{report['preset']}` | {report['device']} | {report['train_minutes']:.1f} min "
        f"| **{ref['accuracy']:.1%}** ({ref['pairs']} pairs, threshold {ref['threshold']:.3f}) "
        f"| {report['lake_runs']['accuracy']:.1%} | `{report['command']}` |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fast", choices=sorted(so.PRESETS))
    parser.add_argument("--data", default=None, help="Omniglot data root (default: $SIAMESE_DATA or ./datasets)")
    parser.add_argument("--mirror", default=None, help="mirror for missing archives")
    parser.add_argument("--runs", required=True, help="Lake's all_runs.zip")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="training seed (it picks the validation alphabets too)")
    parser.add_argument("--eval-seed", type=int, default=0,
                        help="seed of the sampled test trials, pairs and drawer runs: the same for every --seed")
    parser.add_argument("--trials", type=int, default=2000, help="sampled N-way trials, and pairs of each kind")
    parser.add_argument("--drawer-runs", type=int, default=DRAWER_RUNS, help="fresh runs of Lake's design")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    parser.add_argument("--out", default="logs/bench-accuracy", help="run folder (must be new)")
    parser.add_argument("--results", default=str(RESULTS), help="Markdown file to append the row to ('' = none)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--reference-protocol", action="store_true",
                        help="validate on a 90/10 split of every character's images, as the reference did, and "
                             "report its pair accuracy (a separate table)")
    args = parser.parse_args()
    if not looks_like_omniglot(data_root(args.data)):  # a custom tree would be trained and tested on alike
        parser.error(f"{data_root(args.data)}: not Omniglot; the protocols test on its evaluation alphabets")

    device = so.resolve_device(args.device)
    split = {"val_split": "images", "val_fraction": 0.1} if args.reference_protocol else {}
    config = so.preset(args.preset, seed=args.seed, epochs=args.epochs, max_steps=args.max_steps, **split)
    images = so.load_training_set(args.data, args.mirror)
    evaluation = so.load_evaluation_set(args.data, args.mirror)
    runs = so.load_lake_runs(args.runs)
    out = Path(args.out)
    snapshots: dict[int, Path] = {}
    started = time.perf_counter()

    def on_progress(progress) -> None:
        minutes = (time.perf_counter() - started) / 60
        for mark in SNAPSHOT_MINUTES:
            if minutes >= mark and mark not in snapshots:
                snapshots[mark] = trainer.save_snapshot(out / f"after-{mark}-min.pt")

    trainer = so.Trainer(config, images, out, device, on_progress=on_progress)
    result = trainer.fit()
    train_minutes = (time.perf_counter() - started) / 60
    report = {
        "date": date.today().isoformat(),
        "preset": args.preset,
        "device": f"{device} ({platform.processor() or platform.machine()}, torch {torch.__version__})",
        "train_minutes": train_minutes,
        "command": "python " + shlex.join(sys.argv),
        **evaluate_checkpoint(result.best_checkpoint, evaluation, runs, device, args.eval_seed, args.trials,
                              drawer_runs=args.drawer_runs),
        "snapshots": {
            mark: so.lake_runs_accuracy(so.Verifier.from_checkpoint(path, device).model, runs, device).accuracy
            for mark, path in snapshots.items()
        },
    }
    if args.reference_protocol:
        report["reference_protocol"] = so.load_checkpoint(result.best_checkpoint)["metrics"]
    if args.results:
        insert_row(args.results, "## Accuracy", results_row(report))
        if args.reference_protocol:
            insert_row(args.results, "## Reference protocol", reference_row(report))
    print(json.dumps(report, indent=2) if args.json else results_row(report))


if __name__ == "__main__":
    main()
