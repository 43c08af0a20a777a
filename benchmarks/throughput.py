"""Throughput benchmark: training pairs/s of the device-resident pipeline, the model step alone, and a
plain PIL + DataLoader pipeline with the same model.

Pipeline efficiency = pipeline rate / model-only rate (100% means the data path costs nothing).
Timing brackets whole blocks of steps with device synchronisation, after warm-up steps.

    python benchmarks/throughput.py --preset fast --device cpu --steps 60
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shlex
import statistics
import sys
import time
import zipfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from results_table import insert_row

import siamese_omniglot as so
from siamese_omniglot import devices
from siamese_omniglot.data.omniglot import BACKGROUND, find_split
from siamese_omniglot.data.roots import data_root


def timed(step, count: int, device: torch.device) -> float:
    """Seconds for ``count`` calls of ``step``, synchronised on the device at both ends."""
    devices.synchronize(device)
    started = time.perf_counter()
    for _ in range(count):
        step()
    devices.synchronize(device)
    return time.perf_counter() - started


def rate(trainer: so.Trainer, step, warmup: int, steps: int, repeats: int) -> float:
    """Median images/s over ``repeats`` blocks of ``steps`` steps, after ``warmup`` steps."""
    timed(step, warmup, trainer.device)
    seconds = [timed(step, steps, trainer.device) for _ in range(repeats)]
    return trainer.images_per_step * steps / statistics.median(seconds)


def model_only_step(trainer: so.Trainer):
    """One optimizer step on a batch already on the device and already distorted: the model's ceiling."""
    generator = so.data.seeded_generator(0, device=trainer.device)
    # the training objective itself, on a fixed batch (as staged: framed and at the input size, then distorted)
    if trainer.classifier is not None:
        order = torch.randperm(len(trainer.train_set), generator=generator, device=generator.device)
        index = order[: trainer.config.batch_size].to(trainer.device)
        images, labels = trainer.batch(index, generator), trainer.labels[index]
        return lambda: trainer.optimize(lambda: trainer.objective(images, labels))
    pairs = trainer.sampler.sample(trainer.config.batch_size, generator).to(trainer.device)
    first, second = trainer.batch(torch.cat([pairs.first, pairs.second]), generator).chunk(2)
    return lambda: trainer.optimize(lambda: trainer.objective(first, second, pairs.same))


class PngItems(torch.utils.data.Dataset):
    """The conventional pipeline: decode PNGs with PIL and distort them with torchvision, per item.

    An item is one image and its class (the ``classify`` objective) or one pair and whether it is a
    same-class pair (the ``pair`` objective).
    """

    def __init__(self, archive: Path, input_px: int, items: int, pairs: bool) -> None:
        from torchvision import transforms

        self.archive, self.items, self.pairs = archive, items, pairs
        with zipfile.ZipFile(archive) as source:
            names = sorted(n for n in source.namelist() if n.endswith(".png"))
        self.classes: dict[str, list[str]] = {}
        for name in names:
            self.classes.setdefault(name.rsplit("/", 1)[0], []).append(name)
        self.keys = sorted(self.classes)
        self.transform = transforms.Compose([
            transforms.RandomAffine(10, translate=(0.02, 0.02), scale=(0.8, 1.2), shear=17),
            transforms.Resize(input_px, antialias=True),
            transforms.ToTensor(),
        ])
        self._zip: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return self.items

    def _image(self, name: str) -> torch.Tensor:
        if self._zip is None:  # one handle per worker process
            self._zip = zipfile.ZipFile(self.archive)
        with Image.open(io.BytesIO(self._zip.read(name))) as image:
            return 1 - self.transform(image.convert("L"))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng(index)
        first = int(rng.integers(len(self.keys)))
        if not self.pairs:
            return self._image(rng.choice(self.classes[self.keys[first]])), torch.tensor(first)
        second = first if index % 2 else int(rng.integers(len(self.keys)))
        images = [self._image(rng.choice(self.classes[self.keys[c]])) for c in (first, second)]
        return *images, torch.tensor(float(first == second))


def dataloader_rate(trainer: so.Trainer, archive: Path, workers: int, warmup: int, steps: int) -> float:
    """Images/s of the same model and objective fed by PIL + DataLoader, as many images per step."""
    pairs = trainer.classifier is None
    items_per_step = 2 * trainer.config.batch_size if pairs else trainer.config.batch_size
    dataset = PngItems(archive, trainer.model.config.input_px, items_per_step * (warmup + steps), pairs)
    loader = torch.utils.data.DataLoader(dataset, batch_size=items_per_step, num_workers=workers)
    batches = iter(loader)

    def loss(batch: list[torch.Tensor]) -> torch.Tensor:
        if pairs:
            first, second, same = batch
            return F.binary_cross_entropy_with_logits(trainer.model(first, second).float(), same)
        images, labels = batch[0], batch[1] % trainer.classifier.weight.shape[0]
        return F.cross_entropy(trainer.classifier(trainer.model.embed(images)).float(), labels)

    def step() -> None:
        batch = [t.to(trainer.device, non_blocking=True) for t in next(batches)]
        trainer.optimize(lambda: loss(batch))

    timed(step, warmup, trainer.device)
    return trainer.images_per_step * steps / timed(step, steps, trainer.device)


def results_row(report: dict, command: str) -> str:
    """One row of the throughput table of docs/results.md."""
    loader = f"{report['dataloader_images_per_s']:,.0f} ({report['workers']} workers)" if "workers" in report else "—"
    return (
        f"| {date.today().isoformat()} | `{report['preset']}` | {report['device']}, {report['machine']} "
        f"| {report['batch_size']} | {report['pipeline_images_per_s']:,.0f} | {report['pipeline_pairs_per_s']:,.0f} "
        f"| {report['model_only_images_per_s']:,.0f} | {report['pipeline_efficiency']:.1%} | {loader} | `{command}` |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fast", choices=sorted(so.PRESETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="items per step (default: the preset's)")
    parser.add_argument("--data", default=None, help="Omniglot data root")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks (the median is reported)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the PIL pipeline")
    parser.add_argument("--archive", default=None,
                        help="zip of PNGs for the PIL pipeline (default: images_background.zip of the data root)")
    parser.add_argument("--no-dataloader", action="store_true", help="skip the PIL + DataLoader comparison")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--results", default="", help="docs/results.md to add a row to (default: none)")
    args = parser.parse_args()

    device = so.resolve_device(args.device)
    config = so.preset(args.preset, batch_size=args.batch_size, amp=args.amp, augment=True)
    images = so.load_training_set(args.data)
    trainer = so.Trainer(config, images, "unused", device)
    generator = so.data.seeded_generator(config.seed, device=device)
    order = torch.randperm(len(trainer.train_set), generator=generator, device=generator.device).to(device)
    pipeline = rate(trainer, lambda: trainer.train_step(order, generator), args.warmup, args.steps, args.repeats)
    model_only = rate(trainer, model_only_step(trainer), args.warmup, args.steps, args.repeats)
    report = {
        "preset": config.preset,
        "objective": config.objective,
        "device": str(device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "amp": trainer.amp,
        "batch_size": config.batch_size,
        "images_per_step": trainer.images_per_step,
        "pipeline_images_per_s": pipeline,
        "pipeline_pairs_per_s": pipeline / 2,
        "model_only_images_per_s": model_only,
        "pipeline_efficiency": pipeline / model_only,
    }
    archive = Path(args.archive) if args.archive else find_split(data_root(args.data), BACKGROUND)
    if not args.no_dataloader and archive is not None and archive.suffix == ".zip":
        loader = dataloader_rate(trainer, archive, args.workers, args.warmup, args.steps)
        report |= {"dataloader_images_per_s": loader, "dataloader_pairs_per_s": loader / 2, "workers": args.workers}
    if args.results:
        insert_row(args.results, "## Throughput", results_row(report, "python " + shlex.join(sys.argv)))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key:>26}: {value:,.3f}" if isinstance(value, float) else f"{key:>26}: {value}")


if __name__ == "__main__":
    main()
