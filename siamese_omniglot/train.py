"""The training loop: device-resident data, batched augmentation, AMP, validation, checkpoints and logs.

The training images live on the training device as one uint8 tensor at the model's input size
(in host memory when they do not fit: :mod:`siamese_omniglot.staging`); each step gathers a batch by
index, distorts it on the device and runs the model. The loss is accumulated on the device and read
once per log interval, the loop's only host synchronisation. The optimizer steps as one fused kernel on cpu and
cuda, which also lets float16's loss scaler skip an overflowed step on the device; on sdaa the scaler reads
whether the gradients overflowed, one host synchronisation per step.

Two objectives:

- ``pair``: the reference's — binary cross-entropy on the head's logit for balanced same/different pairs.
- ``classify``: softmax over the training characters with a cosine classifier; after each epoch the
  similarity head is fitted by logistic regression on calibration pairs of held-out alphabets.

After every epoch the decision threshold is calibrated on those pairs and the model is measured on
a second, fixed list of validation pairs and on fixed 1-shot trials among the held-out classes (20-way
within an alphabet, or as many ways as the held-out groups allow). ``best.pt`` keeps the epoch with the
highest one-shot accuracy, ROC AUC breaking ties (ROC AUC alone where the held-out classes form no trials).
These validations embed each image once; for a model that averages several views at inference
(``ModelConfig.views``), ``best.pt`` and ``last.pt`` are calibrated and measured again with its views when the run
ends. Every checkpoint records the views its head and threshold were calibrated for (``calibrated_views``), and
``Verifier.from_checkpoint`` embeds with those.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import devices
from .checkpoint import load_checkpoint, save_checkpoint
from .config import MODEL_SETTINGS, REFERENCE_BATCH, TrainConfig
from .data.augment import random_distortion
from .data.episodes import Episodes, sample_episodes
from .data.images import ImageSet
from .data.pairs import Pairs, PairSampler, fixed_pairs, seeded_generator, split_images, split_validation
from .distributed import DistributedContext
from .errors import CheckpointError, ConfigError, DataError, OutputError, SiameseError, TrainingError
from .evaluate import PairMetrics, best_threshold, embed_pixels, one_shot_accuracy, pair_logits, pair_metrics
from .files import atomic_write, remove_stale_temporaries
from .models import CosineClassifier, ModelConfig, SiameseNetwork, build_model
from .plots import panel_chart
from .staging import StagedImages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """A progress report, emitted every ``log_every`` steps."""

    step: int  # optimizer steps taken
    total_steps: int
    epoch: int  # the epoch under way, from 0 (EpochMetrics.epoch counts the epochs ended, from 1)
    loss: float
    lr: float
    pairs_per_s: float
    images_per_s: float


@dataclass(frozen=True)
class EpochMetrics:
    """One line of ``metrics.jsonl``."""

    epoch: int
    step: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_roc_auc: float
    val_eer: float
    val_one_shot: float | None  # accuracy of the validation 1-shot trials (None: the held-out classes form none)
    threshold: float
    lr: float
    pairs_per_s: float
    images_per_s: float
    seconds: float
    paused: bool = False  # a --stop-after pause's validation: logged, and never a candidate for best.pt

    @property
    def score(self) -> tuple[float, float]:
        """What ``best.pt`` maximises (see :func:`selection_score`)."""
        return selection_score(self.val_one_shot, self.val_roc_auc)


NO_SCORE = (-math.inf, -math.inf)  # the best score of a run before any epoch has ended
SCHEDULE_ORDER_WARNING = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"  # torch's


class EpochSoFar(NamedTuple):
    """The part of an epoch taken before a pause, carried into the rest of it: its losses summed (the mean over
    ranks), its steps, the images they took (over all ranks; a resume may change the batch) and its seconds."""

    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    seconds: float = 0.0


def selection_score(one_shot: float | None, roc_auc: float) -> tuple[float, float]:
    """The order of epochs for ``best.pt``: validation one-shot accuracy (the task), then ROC AUC."""
    return (-math.inf if one_shot is None else one_shot, roc_auc)


def _state_score(state: dict) -> tuple[float, float]:
    """The selection score of the validation a checkpoint's ``state`` records."""
    metrics = state.get("metrics", {})
    return selection_score(metrics.get("one_shot"), metrics.get("roc_auc"))


@dataclass(frozen=True)
class Validation:
    """One validation: pair metrics on held-out classes and, where they form trials, 1-shot accuracy, with
    embeddings averaged over ``views`` views (the threshold and head are calibrated for them)."""

    pairs: PairMetrics
    one_shot: float | None
    views: int

    @property
    def score(self) -> tuple[float, float]:
        """What ``best.pt`` maximises (see :func:`selection_score`)."""
        return selection_score(self.one_shot, self.pairs.roc_auc)

    def to_dict(self) -> dict:
        """The ``metrics`` of a checkpoint: the pair metrics and ``one_shot``."""
        return self.pairs.to_dict() | {"one_shot": self.one_shot}


def validation_episodes(images: ImageSet, trials: int, seed: int, most_ways: int = 20) -> Episodes | None:
    """Fixed within-group 1-shot trials among ``images``: ``most_ways``-way, or as many ways as the largest group
    allows; None where no group has two classes with two images each."""
    way = min(most_ways, int(images.group_ranges()[1].max()))
    if way < 2:
        return None
    try:
        return sample_episodes(images, way, 1, trials, seed)
    except DataError:
        return None


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run left its files, its per-epoch metrics, the validation of ``best.pt``'s averaged weights
    where the end of the run averaged them (over ``averaged_epochs``), and, once calibrated for several views at
    the end of the run, ``best.pt``'s validation with them."""

    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    history: tuple[EpochMetrics, ...]
    best_with_views: Validation | None = None
    averaged: Validation | None = None
    averaged_epochs: tuple[int, ...] = ()

    @property
    def best_epoch(self) -> EpochMetrics | None:
        """The epoch ``best.pt`` took its weights from: the highest validation score, the earlier of a tie, as
        training chose it (a pause's validation aside); ``None`` before an epoch has ended. A run resumed from a
        lone ``last.pt`` (no ``best.pt`` beside it) starts its ``best.pt`` anew from there, whatever earlier epoch
        this names."""
        return max((m for m in self.history if not m.paused), key=lambda m: m.score, default=None)


def default_out_dir() -> Path:
    """``logs/<timestamp>/``, as in the reference."""
    return Path("logs") / datetime.now().strftime("%Y_%m_%d_%H_%M_%S")


def same_folder(first: Path, second: Path) -> bool:
    """Whether two paths name one folder (through symbolic links and relative parts)."""
    return first.resolve() == second.resolve()


def check_run_dir(out_dir: Path, resume: str | Path | None = None) -> None:
    """Refuse a run folder that is a file or already holds checkpoints (nothing written is ever overwritten), unless
    it is the folder of the checkpoint being resumed: that run's own."""
    if resume is not None and same_folder(out_dir, Path(resume).parent):
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: is a file; --out must name a folder")
    if out_dir.is_dir() and any(out_dir.glob("*.pt")):
        raise OutputError(
            f"{out_dir}: already holds checkpoints; pass --resume {out_dir / 'last.pt'} "
            "to continue that run, or choose another --out"
        )


def resume_config(
    checkpoint: str | Path, epochs: int | None = None, max_steps: int | None = None, log_every: int | None = None
) -> TrainConfig:
    """The settings a checkpoint was trained with, optionally with more epochs, another step limit or another
    interval between progress reports."""
    state = load_checkpoint(checkpoint)
    if "train_config" not in state:
        raise CheckpointError(f"{checkpoint}: holds no training settings; cannot resume from it")
    try:
        config = TrainConfig.from_dict(state["train_config"])
        # the network's settings as saved, whatever its backbone's defaults are now (they change between versions)
        saved = ModelConfig.from_dict(state["model_config"])
        network = {name: getattr(saved, name) for name in MODEL_SETTINGS}
        return replace(config, epochs=epochs or config.epochs, max_steps=max_steps or config.max_steps,
                       log_every=log_every or config.log_every, **network)
    except (SiameseError, TypeError, ValueError) as error:  # another version's or a hand-made checkpoint
        raise CheckpointError(f"{checkpoint}: its training settings cannot be used ({error})") from None


def _write_checkpoint(state: dict, path: Path) -> None:
    try:
        save_checkpoint(state, path)
    except OSError as error:  # disk full, folder gone or read-only: the file it replaces is intact
        raise OutputError(
            f"{path}: cannot write ({error.strerror or error}); the checkpoint already there is intact"
        ) from None


def _weights_id(state: dict) -> tuple[int, tuple[int, ...]]:
    """What tells a checkpoint's weights apart: its training step, and the epochs averaged into them."""
    return state["training"]["step"], tuple(state.get("averaged_epochs", ()))


def _lay_out_momentum(optimizer: torch.optim.SGD) -> None:
    """Give every weight a momentum buffer in its own memory layout: zeros where it has none yet, which update to
    the gradient itself as torch's first step sets it (there is no dampening), and a copy of a buffer laid out
    otherwise. Fused kernels need both: on a first step the loss scaler skips they keep buffers they never wrote,
    and they read a buffer element by element in the weight's layout."""
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for weight in group["params"]:
            state = optimizer.state[weight]
            buffer = state.get("momentum_buffer")
            if buffer is None:
                state["momentum_buffer"] = torch.zeros_like(weight)
            elif buffer.stride() != weight.stride():
                state["momentum_buffer"] = torch.empty_like(weight).copy_(buffer)


def warm_cosine(step: int, total: int, warmup_fraction: float, min_fraction: float) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to ``min_fraction``."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def calibrate_head(model: SiameseNetwork, embeddings: torch.Tensor, pairs: Pairs) -> None:
    """Set the similarity head to a calibrated L1 distance (classify objective).

    The head becomes ``logit = b − a · Σ|e1 − e2|``: two numbers fitted by logistic regression on fixed
    pairs of held-out alphabets (Platt scaling). Fitting all of the head's weights on a few thousand
    pairs overfits and ranks unseen characters worse than the plain distance.
    """
    head = model.head
    if not isinstance(head, nn.Linear):
        raise TrainingError("only a single linear head can be calibrated; use the pair objective")
    pairs = pairs.to(embeddings.device)
    distance = (embeddings[pairs.first] - embeddings[pairs.second]).abs().sum(1).detach()
    target = pairs.same.float()
    centre, spread = distance.mean(), distance.std().clamp(min=1e-6)
    a = torch.ones((), device=distance.device, requires_grad=True)
    b = torch.zeros((), device=distance.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([a, b], lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(b - a * (distance - centre) / spread, target)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        scale = a.detach() / spread
        head.weight.fill_(-float(scale))
        head.bias.fill_(float(b.detach() + scale * centre))


# Both objectives take batches from Trainer.batch, already framed, distorted and at the model's input size: they go
# to the backbone as they are (framing them again would undo the distortions' shifts and scales).


class _ClassifyObjective(nn.Module):
    """Softmax over training characters on the shared embedding (the head is not involved)."""

    def __init__(self, model: SiameseNetwork, classifier: CosineClassifier) -> None:
        super().__init__()
        self.embedding, self.classifier = model.embedding, classifier

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(self.embedding.at_input_size(images)).float(), labels)


class _PairObjective(nn.Module):
    """The reference's loss: binary cross-entropy on the head's logit for each pair."""

    def __init__(self, model: SiameseNetwork) -> None:
        super().__init__()
        self.model = model

    def forward(self, first: torch.Tensor, second: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.embedding.at_input_size(torch.cat([first, second]))
        logits = self.model.score_embeddings(*embeddings.split(first.shape[0]))
        return F.binary_cross_entropy_with_logits(logits.float(), same.float())


class Trainer:
    """Trains a SiameseNetwork on an ImageSet and writes logs and checkpoints to ``out_dir``.

    In a multi-process job (see :mod:`siamese_omniglot.distributed`) every rank builds its own Trainer;
    gradients are averaged by ``DistributedDataParallel``, each rank draws its own pairs and distortions,
    and rank 0 alone validates and writes files. ``batch_size`` is per rank: the global batch is
    ``batch_size × world_size``.

    Args:
        config: what to train and how.
        images: the training images (Omniglot background or a custom tree); alphabets are held out of
            them for validation.
        out_dir: the run folder; must be new or empty unless resuming.
        device: the training device (see :mod:`siamese_omniglot.devices`).
        on_progress: called every ``config.log_every`` steps (rank 0 only).
        on_epoch: called after every validation (rank 0 only).
        on_start: called once ``fit`` has accepted the run, before anything is written to ``out_dir`` (rank 0 only).
        dist: this process's place in a multi-process job (default: alone).
        staging: where the training images live: ``auto`` (the device when they fit), ``device`` or ``host``
            (see :mod:`siamese_omniglot.staging`).
        compile: run the training step through ``torch.compile`` (not on sdaa).
    """

    def __init__(
        self,
        config: TrainConfig,
        images: ImageSet,
        out_dir: str | Path,
        device: torch.device,
        on_progress: Callable[[Progress], None] | None = None,
        on_epoch: Callable[[EpochMetrics], None] | None = None,
        on_start: Callable[[], None] | None = None,
        dist: DistributedContext | None = None,
        staging: str = "auto",
        compile: bool = False,
    ) -> None:
        if compile and not devices.can_compile(device):
            raise ConfigError(f"--compile is not supported on {device.type}: its compiler covers only part of torch")
        self.config = config
        self.device = device
        self.dist = dist or DistributedContext()
        self.out_dir = Path(out_dir)
        self.on_progress = on_progress if self.dist.is_main else None
        self.on_epoch = on_epoch if self.dist.is_main else None
        self.on_start = on_start if self.dist.is_main else None
        self.amp = devices.amp_default(device) if config.amp is None else config.amp
        split = split_images if config.val_split == "images" else split_validation
        train, val = split(images, config.val_fraction, config.seed)
        self.train_set, self.val_set = train, val
        log.info(
            "training on %d classes (%d images), validating on %d held-out classes in %d groups",
            train.num_classes, len(train), val.num_classes, len(val.group_names),
        )
        torch.manual_seed(config.seed)
        self.model = build_model(config.backbone, pretrained=config.pretrained, **config.model_overrides()).to(device)
        self.memory_format = devices.memory_format(device)
        self.model.to(memory_format=self.memory_format)
        if config.objective == "classify":
            self.classifier = CosineClassifier(self.model.embedding_dim, train.num_classes).to(device)
            objective: nn.Module = _ClassifyObjective(self.model, self.classifier)
        else:
            self.classifier = None
            objective = _PairObjective(self.model)
        if self.dist.enabled:
            ids = [device.index] if device.type != "cpu" else None
            objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
        self.objective = torch.compile(objective) if compile else objective
        # distorted at `supersample` times the input size (at most the least multiple reaching the images' own size),
        # then averaged down: strokes stay as sharp as in the area-resized images the model sees outside training,
        # where resampling at 28 px would blur them
        input_px = self.model.config.input_px
        finest = math.ceil(train.pixels.shape[-1] / input_px)
        self.supersample = min(config.supersample, finest) if config.augment else 1
        self.staged = StagedImages(
            train.pixels, input_px * self.supersample, device, staging, to_input=self.model.embedding.to_input
        )
        self.labels = train.labels.to(device)
        self.sampler = PairSampler(train, config.within_alphabet, device) if config.objective == "pair" else None
        self.calibration_pairs = fixed_pairs(val, config.val_pairs, config.seed + 1, config.within_alphabet)
        self.val_pairs = fixed_pairs(val, config.val_pairs, config.seed + 2, config.within_alphabet)
        self.val_episodes = validation_episodes(val, config.val_trials, config.seed + 3)
        self.global_batch = config.batch_size * self.dist.world_size
        if self.global_batch > len(train):
            processes = f" × {self.dist.world_size} processes" if self.dist.enabled else ""
            raise ConfigError(
                f"batch size {config.batch_size}{processes} exceeds the {len(train)} training images: an epoch must "
                "hold one batch at least; lower --batch-size"
            )
        self.steps_per_epoch = len(train) // self.global_batch  # ≥ 1: the batch fits in the data
        planned = config.epochs * self.steps_per_epoch
        self.total_steps = min(planned, config.max_steps) if config.max_steps else planned
        self.stop_step = self.total_steps  # fit(stop_after=…) pauses earlier, the schedule unchanged
        self.base_lr = config.lr * self.global_batch / REFERENCE_BATCH
        self.optimizer = torch.optim.SGD(
            objective.parameters(),
            lr=self.base_lr,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
            fused=devices.fuses_optimizer(device),
        )
        _lay_out_momentum(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warm_cosine(step, self.total_steps, config.warmup_fraction, config.min_lr_fraction),
        )
        self.scaler = devices.grad_scaler(device, self.amp)
        self.history: list[EpochMetrics] = []
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.generator_state: torch.Tensor | None = None  # the pair and distortion stream of a paused epoch
        self._epoch_generator: torch.Generator | None = None  # the stream of the epoch under way
        self.carried = EpochSoFar()  # a paused epoch's part before the pause
        self._stretch_loss = torch.zeros((), device=device)  # the epoch under way since its start or its resume
        self._stretch_steps, self._stretch_started = 0, 0.0
        self.best_score = NO_SCORE
        # the `average_best` best epochs so far, best first: {"score", "epoch", "model" (weights on the CPU)}
        self.top_epochs: list[dict] = []

    # --- the loop ------------------------------------------------------------------------------------

    def fit(self, resume: str | Path | None = None, stop_after: int | None = None) -> TrainResult:
        """Train until ``epochs`` or ``max_steps``; returns where the checkpoints are.

        At the last step ``best.pt`` takes the average of the ``average_best`` best epochs' weights where that
        validates higher, then ``best.pt`` and ``last.pt`` are calibrated for the model's views.

        Args:
            resume: a ``last.pt`` to continue from (optimizer, schedule, random streams and position included).
            stop_after: pause once the run has taken this many steps in all, writing ``last.pt`` there. Unlike
                ``max_steps`` it leaves the learning-rate schedule alone: resuming later gives the same weights,
                bit for bit, as a run that never paused.
        """
        if self.dist.is_main:
            check_run_dir(self.out_dir, resume)
        state = self._restore(resume) if resume is not None else None
        if self.step > self.total_steps:  # resumed with fewer --epochs or --max-steps than it has taken
            limits = f"epochs {self.config.epochs}"
            if self.config.max_steps:
                limits += f", max steps {self.config.max_steps}"
            raise ConfigError(f"the run is already at step {self.step}, past its last step {self.total_steps} "
                              f"({limits})")
        saved = state["train_config"] if state is not None else {}
        kept_limit = self.config.max_steps is not None and self.config.max_steps == saved.get("max_steps")
        more_epochs = kept_limit and self.config.epochs > saved["epochs"]
        if more_epochs and saved["epochs"] * self.steps_per_epoch >= self.config.max_steps:
            # the step limit, not the epochs, ended the run: the new --epochs would change nothing but config.json
            raise ConfigError(f"--epochs {self.config.epochs}: the run's max steps {self.config.max_steps}, which a "
                              f"resume keeps, end it at step {self.total_steps} first; pass a larger --max-steps too")
        if stop_after is not None and stop_after <= self.step:
            raise ConfigError(f"stop after step {stop_after}: the run is already at step {self.step}")
        if self.dist.is_main:  # accepted: only now is anything written
            if self.on_start is not None:
                self.on_start()
            if state is not None:
                self._write_resumed(state, Path(resume))
            else:
                self._prepare_out_dir()
        self.stop_step = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        self.dist.barrier()
        self.model.train()
        while self.epoch < self.config.epochs and self.step < self.stop_step:
            self._run_epoch()
        if not self.history:
            raise TrainingError("nothing to train: the run already reached its last step")
        best, last = self.out_dir / "best.pt", self.out_dir / "last.pt"
        averaged = best_with_views = None
        if self.step >= self.total_steps:
            if self.dist.is_main:
                averaged = self._average_best(best)
                if self.model.config.views > 1:
                    best_with_views = self._calibrate_views(best, last)
            self.dist.barrier()
        epochs = tuple(entry["epoch"] for entry in self.top_epochs) if averaged is not None else ()
        return TrainResult(self.out_dir, best, last, tuple(self.history), best_with_views, averaged, epochs)

    def _run_epoch(self) -> None:
        config = self.config
        # drawn on the device: no host round trip per step; the permutation is shared by all ranks
        shared = seeded_generator(config.seed, self.epoch, device=self.device)
        order = torch.randperm(len(self.train_set), generator=shared, device=shared.device).to(self.device)
        keys = (config.seed, self.epoch, self.dist.rank)
        if self.step_in_epoch != 0 and self.generator_state is None:
            keys += (self.step_in_epoch,)  # resumed mid-epoch without this rank's stream: not the epoch's first draws
        generator = seeded_generator(*keys, device=self.device)
        if self.generator_state is not None:  # resuming mid-epoch
            generator.set_state(self.generator_state)
            self.generator_state = None
        self._epoch_generator = generator
        self._stretch_loss.fill_(self.carried.loss_sum)  # as a run never paused sums it (to the last bit, alone)
        interval_loss = torch.zeros((), device=self.device)
        self._stretch_steps, interval_steps = 0, 0
        self._stretch_started = interval_started = time.perf_counter()
        while self.step_in_epoch < self.steps_per_epoch and self.step < self.stop_step:
            loss = self.train_step(order, generator)
            self._stretch_loss += loss
            interval_loss += loss
            self._stretch_steps += 1
            interval_steps += 1
            self.step += 1
            self.step_in_epoch += 1
            if self.step % config.log_every == 0 or self.step == self.stop_step:
                # the loop's only host sync (but for float16's scaler on sdaa): every rank reaches it at the same step
                mean_loss = float(self.dist.all_reduce_mean(interval_loss)) / interval_steps
                if not math.isfinite(mean_loss):
                    raise self._diverged(f"the loss became {mean_loss}")
                now = time.perf_counter()
                images_per_s = interval_steps * self.images_per_step / (now - interval_started)
                self._report(mean_loss, images_per_s)
                interval_loss.zero_()
                interval_steps, interval_started = 0, now
        devices.synchronize(self.device)
        so_far = self._epoch_so_far()
        self._epoch_generator = None
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch, self.carried = self.epoch + 1, 0, EpochSoFar()
        else:
            self.generator_state, self.carried = generator.get_state(), so_far
        images_per_s = so_far.images / max(so_far.seconds, 1e-9)
        train_loss = so_far.loss_sum / max(so_far.steps, 1)
        # steps since the last log interval, and the last step's update, are checked before anything is saved
        if not math.isfinite(train_loss) or not self._weights_finite():
            raise self._diverged("the loss or the weights stopped being finite")
        self._end_epoch(train_loss, images_per_s, so_far.seconds)

    def _epoch_so_far(self) -> EpochSoFar:
        """The epoch under way up to now, the part before a pause included (collective: every rank takes part)."""
        loss_sum = float(self.dist.all_reduce_mean(self._stretch_loss))  # every rank's sum started at the carried one
        images = self.carried.images + self._stretch_steps * self.images_per_step
        seconds = self.carried.seconds + time.perf_counter() - self._stretch_started
        return EpochSoFar(loss_sum, self.carried.steps + self._stretch_steps, images, seconds)

    def _diverged(self, what: str) -> TrainingError:
        """The error that ends a run whose loss or weights are no longer finite: ``what`` happened by this step."""
        kept = "the last good checkpoint is kept" if self.history else "no checkpoint had been saved yet"
        advice = "lower --lr or pass --no-amp" if self.amp else "lower --lr"
        return TrainingError(f"{what} by step {self.step}; {kept} — {advice}")

    def _weights_finite(self) -> bool:
        flags = [torch.isfinite(p).all() for p in self.objective.parameters()]
        return bool(torch.stack(flags).all()) if flags else True

    @property
    def images_per_step(self) -> int:
        """Images through the network per optimizer step, over all ranks."""
        per_item = 4 if self.config.objective == "pair" else 1
        return self.global_batch * per_item

    def train_step(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One optimizer step on this rank's share of the next batch (``order``: the epoch's permutation)."""
        size = self.config.batch_size
        if self.classifier is not None:
            start = (self.step_in_epoch * self.dist.world_size + self.dist.rank) * size
            index = order[start : start + size]
            images, labels = self.batch(index, generator), self.labels[index]
            return self.optimize(lambda: self.objective(images, labels))
        pairs = self.sampler.sample(size, generator).to(self.device)
        first, second = self.batch(torch.cat([pairs.first, pairs.second]), generator).chunk(2)
        return self.optimize(lambda: self.objective(first, second, pairs.same))

    def optimize(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Forward (under autocast) and backward ``loss_fn``, then step the optimizer, scaler and schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        with devices.autocast(self.device, self.amp):
            loss = loss_fn()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.step == 0:  # a first step the loss scaler skipped is no misuse of the schedule, as torch warns
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", re.escape(SCHEDULE_ORDER_WARNING), UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        return loss.detach()

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training images ``index`` as float ink on the device at the model's input size, distorted when
        augmenting."""
        images = self.staged.gather(index).float().div_(255)
        if self.config.augment:
            images = random_distortion(images, generator, elastic=self.config.elastic)
            images = F.avg_pool2d(images, self.supersample) if self.supersample > 1 else images
        return images.contiguous(memory_format=self.memory_format)

    def _report(self, loss: float, images_per_s: float) -> None:
        if self.on_progress is None:
            return
        pairs_per_s = images_per_s / 2
        lr = self.optimizer.param_groups[0]["lr"]
        self.on_progress(Progress(self.step, self.total_steps, self.epoch, loss, lr, pairs_per_s, images_per_s))

    # --- validation, checkpoints, logs ---------------------------------------------------------------

    def validate(self, views: int | None = None, model: SiameseNetwork | None = None) -> Validation:
        """Calibrate (head for ``classify``, threshold always) on calibration pairs; measure on val pairs and trials.

        Args:
            views: embed each image as the average of this many views (default: the model's own).
            model: the model to calibrate and measure (default: the one in training).
        """
        model = model if model is not None else self.model
        views = model.config.views if views is None else views
        embeddings = embed_pixels(model, self.val_set.pixels, self.device, views=views)
        if self.classifier is not None:
            calibrate_head(model, embeddings, self.calibration_pairs)
        calibration = torch.sigmoid(pair_logits(model, embeddings, self.calibration_pairs))
        threshold = best_threshold(calibration, self.calibration_pairs.same)
        pairs = pair_metrics(pair_logits(model, embeddings, self.val_pairs), self.val_pairs.same, threshold)
        episodes = self.val_episodes
        one_shot = None if episodes is None else one_shot_accuracy(model, embeddings, episodes).accuracy
        return Validation(pairs, one_shot, views)

    def save_snapshot(self, path: str | Path) -> Path:
        """Validate now (with the model's views) and save a checkpoint of the current state to ``path`` (outside
        the best/last pair), from which a run resumes exactly, also mid-epoch (from ``on_progress``).

        It gathers every process's random streams, so in a distributed run every rank must call it at the same
        step, which ``on_progress`` (rank 0 only) cannot do; rank 0 validates and writes the file.
        """
        running = self._epoch_generator is not None  # else at an epoch's start or in a paused one
        stream = self._epoch_generator.get_state() if running else self.generator_state
        streams = self.dist.gather_objects(stream)  # collective: every rank takes part, as below
        so_far = self._epoch_so_far() if running else self.carried
        if self.dist.is_main:
            _write_checkpoint(self._state(self.validate(), streams, so_far), Path(path))
        # rank 0 calibrated the head: every rank goes on with the same one
        self.dist.broadcast([*self.model.head.parameters(), *self.model.buffers()])
        return Path(path)

    def _rank_epoch(self, score: tuple[float, float], epoch: int) -> None:
        """Keep this epoch's weights among the ``average_best`` best so far (an earlier epoch wins a tie)."""
        keep = self.config.average_best
        if keep < 2 or (len(self.top_epochs) == keep and score <= tuple(self.top_epochs[-1]["score"])):
            return
        weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model.state_dict().items()}
        entry = {"score": list(score), "epoch": epoch, "model": weights}
        ranked = sorted([*self.top_epochs, entry], key=lambda e: tuple(e["score"]), reverse=True)  # stable
        self.top_epochs = ranked[:keep]

    def _average_best(self, best: Path) -> Validation | None:
        """Write into ``best.pt`` the average of the best epochs' weights (batch-norm statistics included), its head
        and threshold calibrated, where it validates higher than the best epoch alone; returns its validation then.

        Two validation peaks epochs apart average into a network that generalises better than either
        (docs/results.md, "What was tried"); the moving average of every step does not."""
        if not self.top_epochs:
            return None
        state = load_checkpoint(best, map_location=self.device)
        if len(self.top_epochs) >= 2:
            model = self._model_from([entry["model"] for entry in self.top_epochs])
            val = self.validate(views=1, model=model)
            if val.score > tuple(self.top_epochs[0]["score"]):
                self._write_best(state, best, model, val, [entry["epoch"] for entry in self.top_epochs])
                return val
        # a run extended past an earlier end may hold that end's average in best.pt: back to the best epoch alone
        if "averaged_epochs" in state:
            model = self._model_from([self.top_epochs[0]["model"]])
            self._write_best(state, best, model, self.validate(views=1, model=model), None)
        return None

    def _model_from(self, states: list[dict]) -> SiameseNetwork:
        """A model in the training layout with the mean of ``states`` (integer buffers from the first)."""
        weights = {
            name: (sum(state[name].double() for state in states) / len(states)).to(tensor.dtype)
            if tensor.is_floating_point() else tensor
            for name, tensor in states[0].items()
        }
        model = SiameseNetwork(self.model.config).to(self.device, memory_format=self.memory_format)
        model.load_state_dict(weights)
        return model

    @staticmethod
    def _write_best(
        state: dict, best: Path, model: SiameseNetwork, val: Validation, averaged: list[int] | None
    ) -> None:
        """Put ``model``, calibrated by ``val`` for one view, into ``best.pt``'s ``state`` (its training state
        unchanged) and write it."""
        state.update(model=model.state_dict(), threshold=val.pairs.threshold, metrics=val.to_dict(), calibrated_views=1)
        if averaged is None:
            state.pop("averaged_epochs", None)
        else:
            state["averaged_epochs"] = averaged
        _write_checkpoint(state, best)

    def _calibrate_views(self, best: Path, last: Path) -> Validation:
        """Recalibrate the heads and thresholds of ``best.pt`` and ``last.pt`` for the model's views (once when they
        hold the same weights), record those validations, and return ``best.pt``'s."""
        states = {path: load_checkpoint(path, map_location=self.device) for path in (best, last)}
        calibrated: dict[tuple, tuple[dict, Validation]] = {}  # by _weights_id
        for path, state in states.items():
            key = _weights_id(state)
            if key not in calibrated:
                model = self._model_from([state["model"]])
                calibrated[key] = (model.state_dict(), self.validate(model=model))
            weights, val = calibrated[key]
            # "training" keeps the one-view selection score, which no longer matches these metrics: _repair_best,
            # which looks for that match, leaves a calibrated best.pt alone
            state.update(model=weights, threshold=val.pairs.threshold, metrics=val.to_dict(),
                         calibrated_views=val.views)
            _write_checkpoint(state, path)
        return calibrated[_weights_id(states[best])][1]

    def _end_epoch(self, train_loss: float, images_per_s: float, seconds: float) -> None:
        generators = self.dist.gather_objects(self.generator_state)  # collective: every rank takes part
        val = self.validate(views=1) if self.dist.is_main else None
        val = self.dist.broadcast_object(val)
        # rank 0 calibrated the head and holds the batch-norm statistics the checkpoint records
        self.dist.broadcast([*self.model.head.parameters(), *self.model.buffers()])
        # a pause's validation is for its log and last.pt: selecting by it would make best.pt depend on the pauses
        paused = self.step_in_epoch != 0 and self.step < self.total_steps
        metrics = EpochMetrics(
            epoch=self.epoch if self.step_in_epoch == 0 else self.epoch + 1,
            step=self.step,
            train_loss=train_loss,
            val_loss=val.pairs.loss,
            val_accuracy=val.pairs.accuracy,
            val_roc_auc=val.pairs.roc_auc,
            val_eer=val.pairs.eer,
            val_one_shot=val.one_shot,
            threshold=val.pairs.threshold,
            lr=self.optimizer.param_groups[0]["lr"],
            pairs_per_s=images_per_s / 2,
            images_per_s=images_per_s,
            seconds=seconds,
            paused=paused,
        )
        self.history.append(metrics)
        improved = not paused and val.score > self.best_score
        if improved:
            self.best_score = val.score
        if self.dist.is_main:
            if not paused:
                self._rank_epoch(val.score, metrics.epoch)
            state = self._state(val, generators)
            # last.pt first: a crash between the two saves is repaired on resume (see _repair_best)
            for path in [self.out_dir / "last.pt"] + ([self.out_dir / "best.pt"] if improved else []):
                _write_checkpoint(state, path)
            try:
                self._write_logs()
            except OSError as error:
                raise OutputError(f"{self.out_dir}: cannot write the logs ({error.strerror or error})") from None
        self.dist.barrier()
        if self.on_epoch is not None:
            self.on_epoch(metrics)

    def _state(self, val: Validation, generators: list, so_far: EpochSoFar | None = None) -> dict:
        """The checkpoint of this moment, validated by ``val``; ``so_far``: the epoch under way (default: the part
        of a paused epoch before its pause)."""
        return {
            "model_config": self.model.config.to_dict(),
            "model": self.model.state_dict(),
            "threshold": val.pairs.threshold,
            "calibrated_views": val.views,
            "train_config": self.config.to_dict(),
            "metrics": val.to_dict(),
            "classes": {"train": list(self.train_set.class_names), "val": list(self.val_set.class_names)},
            "training": {
                "epoch": self.epoch,
                "step": self.step,
                "items_in_epoch": self.step_in_epoch * self.global_batch,
                "world_size": self.dist.world_size,
                "best_score": list(self.best_score),
                "top_epochs": self.top_epochs,
                "generators": generators,  # one per rank; None at an epoch boundary
                "epoch_so_far": (self.carried if so_far is None else so_far)._asdict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "classifier": self.classifier.state_dict() if self.classifier is not None else None,
                "torch_rng": torch.get_rng_state(),
                "history": [asdict(m) for m in self.history],
            },
        }

    def _restore(self, path: str | Path) -> dict:
        """Load a checkpoint's training state into this trainer (nothing is written); returns the checkpoint."""
        state = load_checkpoint(path, map_location=self.device)
        training = state.get("training")
        if training is None:
            raise CheckpointError(f"{path}: holds no training state (exported weights?); cannot resume from it")
        saved = ModelConfig.from_dict(state["model_config"])
        if saved != self.model.config:
            raise CheckpointError(f"{path}: was trained with {saved}, not {self.model.config}; use the same preset")
        if state["train_config"].get("objective", TrainConfig.objective) != self.config.objective:
            raise CheckpointError(f"{path}: was trained with another objective; use the same preset")
        if state.get("classes", {}).get("train") != list(self.train_set.class_names):
            raise CheckpointError(f"{path}: was trained on other data or another split; use the same --data")
        self.model.load_state_dict(state["model"])
        if self.classifier is not None:
            if training["classifier"] is None:
                raise CheckpointError(f"{path}: has no classifier state for the classify objective")
            self.classifier.load_state_dict(training["classifier"])
        self.optimizer.load_state_dict(training["optimizer"])
        for group in self.optimizer.param_groups:  # the kernel is this device's, not the one that saved the state
            group["fused"] = self.optimizer.defaults["fused"]
        _lay_out_momentum(self.optimizer)  # saved on sdaa, contiguous; here channels-last, as the weights
        self.scheduler.load_state_dict(training["scheduler"])
        if self.scaler is not None and training["scaler"] is not None:
            self.scaler.load_state_dict(training["scaler"])
        torch.set_rng_state(training["torch_rng"].cpu())
        self.epoch, self.best_score = training["epoch"], tuple(training["best_score"])
        self.top_epochs = [
            entry | {"model": {name: tensor.cpu() for name, tensor in entry["model"].items()}}
            for entry in training.get("top_epochs", [])
        ]
        # the position in the epoch is kept in items, so a job may resume with another number of processes
        self.step_in_epoch = training["items_in_epoch"] // self.global_batch
        self.step = self.epoch * self.steps_per_epoch + self.step_in_epoch
        self._resume_schedule()
        # by name, what this version knows of it; none before it was saved: the epoch's loss is this stretch's alone
        saved_so_far = training.get("epoch_so_far", {})
        self.carried = EpochSoFar(**{key: saved_so_far[key] for key in EpochSoFar._fields if key in saved_so_far})
        generators = training["generators"]
        if len(generators) != self.dist.world_size:
            log.warning("resuming %d processes from %d: new pair streams from here on", self.dist.world_size,
                        len(generators))
        elif generators[self.dist.rank] is not None:
            state_now = generators[self.dist.rank].cpu()
            if self._fits_generator(state_now):
                self.generator_state = state_now
            else:  # a CPU generator's state is 5,056 bytes, a CUDA one's 16
                log.warning("resuming on %s a run paused on another kind of device: new pair streams from here on",
                            self.device.type)
        known = {field.name for field in fields(EpochMetrics)}  # a later version's keys are left behind
        self.history = [EpochMetrics(**{key: value for key, value in m.items() if key in known})
                        for m in training["history"]]
        log.info("resuming %s at epoch %d, step %d", path, self.epoch, self.step)
        return state

    def _fits_generator(self, state: torch.Tensor) -> bool:
        """Whether ``state`` is the state of a pair generator on this run's device."""
        try:
            seeded_generator(0, device=self.device).set_state(state)
        except RuntimeError:
            return False
        return True

    def _resume_schedule(self) -> None:
        """Put this run's schedule at its step: the checkpoint's optimizer carries the rate of the run that saved it,
        which another length (``--epochs``, ``--max-steps``) or another number of processes changes."""
        factor = self.scheduler.lr_lambdas[0](self.step)
        self.scheduler.base_lrs = [self.base_lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = self.base_lr, self.base_lr * factor
        self.scheduler.last_epoch = self.step

    def _write_resumed(self, state: dict, path: Path) -> None:
        """The run folder of a resumed run: its config, ``last.pt`` and ``best.pt`` where they are missing or
        stale, and its logs rewritten from the checkpoint's history."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()  # the resumed settings: --epochs, --max-steps and the process count may differ
            for name in ("last.pt", "best.pt"):  # what saves cut short by a kill left, a whole checkpoint each
                remove_stale_temporaries(self.out_dir / name)
            if not same_folder(self.out_dir, path.parent):  # the run goes on in a new folder
                self._carry_over(state, path)
            self._repair_best(state)
            self._restore_missing_best(state)
            if self.history:
                self._write_logs()  # drop what a crash left of later epochs
        except OSError as error:
            raise OutputError(f"{self.out_dir}: cannot write ({error.strerror or error})") from None

    def _repair_best(self, state: dict) -> None:
        """Rewrite ``best.pt`` from the resumed state when that state is the best epoch but ``best.pt``
        is missing or older: a crash between saving ``last.pt`` and ``best.pt`` loses nothing."""
        if _state_score(state) != tuple(state["training"]["best_score"]):
            return
        best = self.out_dir / "best.pt"
        try:
            current = load_checkpoint(best)["training"]["step"] if best.exists() else None
        except (CheckpointError, KeyError, TypeError):
            current = None
        if current != state["training"]["step"]:
            log.warning("%s does not hold the best epoch so far (step %d); writing it from the resumed checkpoint",
                        best, state["training"]["step"])
            _write_checkpoint(state, best)

    def _restore_missing_best(self, state: dict) -> None:
        """Give a run folder without ``best.pt`` (a lone ``last.pt`` resumed elsewhere, a kill while carrying one
        over) a ``best.pt`` again: the best epoch's weights where the checkpoint keeps them, else the resumed state,
        which then is the best so far."""
        best = self.out_dir / "best.pt"
        if best.exists() or self.best_score == NO_SCORE:  # no epoch has ended: the first to end writes best.pt
            return
        if self.top_epochs:
            model = self._model_from([self.top_epochs[0]["model"]])
            self._write_best(dict(state), best, model, self.validate(views=1, model=model), None)
            log.warning("%s was missing; written from the weights of epoch %d, the best so far, which the checkpoint "
                        "keeps", best, self.top_epochs[0]["epoch"])
            return
        self.best_score = _state_score(state)
        state["training"]["best_score"] = list(self.best_score)
        _write_checkpoint(state, best)
        log.warning("%s was missing and the checkpoint keeps no earlier epoch's weights; it starts from the resumed "
                    "state (step %d)", best, self.step)

    def _carry_over(self, state: dict, source: Path) -> None:
        """Start a new run folder for a run resumed from ``source`` elsewhere: ``last.pt`` from the resumed state,
        and ``best.pt`` from the one beside ``source`` while no later epoch has beaten it."""
        _write_checkpoint(state, self.out_dir / "last.pt")
        earlier = source.parent / "best.pt"
        try:
            carried = load_checkpoint(earlier) if earlier.exists() else None
        except CheckpointError as error:
            log.warning("%s; the new run folder starts without a best.pt", error)
            carried = None
        training = carried.get("training") if carried is not None else None
        if isinstance(training, dict) and training.get("best_score") == state["training"]["best_score"]:
            _write_checkpoint(carried, self.out_dir / "best.pt")

    def _prepare_out_dir(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "epoch_loss.txt", "epoch_val_loss.txt"):
                (self.out_dir / name).write_text("")
            self._write_config()
        except OSError as error:
            raise OutputError(f"{self.out_dir}: cannot write ({error.strerror})") from None

    def _write_config(self) -> None:
        config = {"train": self.config.to_dict(), "model": self.model.config.to_dict()}
        config |= {"device": str(self.device), "amp": self.amp, "steps_per_epoch": self.steps_per_epoch}
        with atomic_write(self.out_dir / "config.json", "w") as file:
            file.write(json.dumps(config, indent=2) + "\n")

    def _write_logs(self) -> None:
        """Rewrite the logs from the history, each file replaced whole: after a crash and a resume they
        list exactly the epochs of the checkpoint, never a half line or an epoch twice."""
        texts = {
            "metrics.jsonl": "".join(json.dumps(asdict(m)) + "\n" for m in self.history),
            "epoch_loss.txt": "".join(f"{m.train_loss}\n" for m in self.history),
            "epoch_val_loss.txt": "".join(f"{m.val_loss}\n" for m in self.history),
        }
        for name, text in texts.items():
            with atomic_write(self.out_dir / name, "w") as file:
                file.write(text)
        panels = {  # a panel each: the two losses differ in kind for the classify objective
            "train loss": {"train loss": [m.train_loss for m in self.history]},
            "val loss": {"val loss": [m.val_loss for m in self.history]},
            "validation": {
                "val accuracy": [m.val_accuracy for m in self.history],
                "val ROC AUC": [m.val_roc_auc for m in self.history],
            },
        }
        if self.val_episodes is not None:
            way = self.val_episodes.support.shape[1]
            panels["validation"][f"val {way}-way 1-shot"] = [m.val_one_shot for m in self.history]
        with atomic_write(self.out_dir / "epoch_loss.png") as file:
            panel_chart(panels, file.name, title=f"{self.config.preset}: loss and validation accuracy per epoch")

