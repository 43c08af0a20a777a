"""Training: real short runs on a small Omniglot tree: files written, loss falling, step limits, resume."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import warnings
from dataclasses import asdict, replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from siamese_omniglot import devices
from siamese_omniglot.checkpoint import load_checkpoint
from siamese_omniglot.config import TrainConfig, preset
from siamese_omniglot.data import ImageSet, load_folder, seeded_generator
from siamese_omniglot.data.augment import random_distortion
from siamese_omniglot.data.images import to_ink
from siamese_omniglot.errors import CheckpointError, ConfigError, OutputError, TrainingError
from siamese_omniglot.evaluate import best_threshold, embed_pixels, one_shot_accuracy, pair_logits, roc_auc
from siamese_omniglot.models import ModelConfig, SiameseNetwork
from siamese_omniglot.train import (
    EpochMetrics,
    Progress,
    Trainer,
    Validation,
    calibrate_head,
    resume_config,
    selection_score,
    validation_episodes,
    warm_cosine,
)
from siamese_omniglot.verify import Verifier

CPU = torch.device("cpu")
METRIC_KEYS = {
    "epoch",
    "step",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_roc_auc",
    "val_eer",
    "val_one_shot",
    "threshold",
    "lr",
    "pairs_per_s",
    "images_per_s",
    "seconds",
    "paused",
}


class Interrupted(Exception):
    """Stands for a crash right after a checkpoint was written."""


@pytest.fixture(scope="module")
def images(mini_background: Path) -> ImageSet:
    return load_folder(mini_background)


@pytest.fixture(scope="module")
def small(images: ImageSet) -> ImageSet:
    """One alphabet's 6 characters: 4 to train on (80 images), 2 held out."""
    return images.subset_classes(torch.arange(6))


@pytest.fixture(scope="module")
def classify_run(images: ImageSet, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """30 steps of the default (classify) objective: 840 training images, 26 steps per epoch."""
    config = preset("fast", max_steps=30, batch_size=32, val_pairs=50, log_every=5)
    out = tmp_path_factory.mktemp("classify") / "run"
    progress: list[Progress] = []
    epochs: list[EpochMetrics] = []
    trainer = Trainer(config, images, out, CPU, on_progress=progress.append, on_epoch=epochs.append)
    result = trainer.fit()
    return {"config": config, "out": out, "trainer": trainer, "result": result, "progress": progress, "epochs": epochs}


def test_run_writes_config_and_per_epoch_logs(classify_run: dict) -> None:
    out, result = classify_run["out"], classify_run["result"]
    assert classify_run["trainer"].steps_per_epoch == 840 // 32
    config = json.loads((out / "config.json").read_text())
    assert config["train"] == classify_run["config"].to_dict()
    assert config["model"] == classify_run["trainer"].model.config.to_dict()
    assert (config["device"], config["amp"], config["steps_per_epoch"]) == ("cpu", False, 26)

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [set(line) for line in lines] == [METRIC_KEYS, METRIC_KEYS]
    assert [(line["epoch"], line["step"]) for line in lines] == [(1, 26), (2, 30)]
    assert lines == [asdict(m) for m in result.history] == [asdict(m) for m in classify_run["epochs"]]
    assert [float(x) for x in (out / "epoch_loss.txt").read_text().split()] == [m["train_loss"] for m in lines]
    assert [float(x) for x in (out / "epoch_val_loss.txt").read_text().split()] == [m["val_loss"] for m in lines]
    for line in lines:
        assert 0 <= line["val_accuracy"] <= 1 and 0 <= line["val_roc_auc"] <= 1 and 0 < line["threshold"] < 1
        assert 0 <= line["val_one_shot"] <= 1
        assert line["images_per_s"] == pytest.approx(2 * line["pairs_per_s"])


def test_loss_chart_is_a_png(classify_run: dict) -> None:
    with Image.open(classify_run["out"] / "epoch_loss.png") as chart:
        assert chart.format == "PNG"
        assert chart.size == (720, 440)
        assert len(chart.getcolors(1 << 16)) > 2  # axes, text and coloured lines, not a blank page


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_checkpoints_load_with_weights_only(classify_run: dict, name: str) -> None:
    state = torch.load(classify_run["out"] / name, map_location="cpu", weights_only=True)
    model = SiameseNetwork(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    history = classify_run["result"].history
    best = max(history, key=lambda m: (m.val_one_shot, m.val_roc_auc))
    saved = best if name == "best.pt" else history[-1]
    assert state["training"]["step"] == saved.step
    assert state["train_config"] == classify_run["config"].to_dict()


def calibrated_for(trainer: Trainer, path: Path, views: int) -> None:
    """Assert that a checkpoint's head, threshold and metrics are those of a validation with ``views`` views."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["calibrated_views"] == views
    model = SiameseNetwork(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    embeddings = embed_pixels(model, trainer.val_set.pixels, CPU, views=views)
    assert one_shot_accuracy(model, embeddings, trainer.val_episodes).accuracy == state["metrics"]["one_shot"]
    pairs = trainer.calibration_pairs
    scores = torch.sigmoid(pair_logits(model, embeddings, pairs))
    # equal up to float rounding, which torch 2.4 leaves at about 1e-6 here
    assert best_threshold(scores, pairs.same) == pytest.approx(state["threshold"], abs=1e-5)
    assert Verifier.from_checkpoint(path, "cpu").model.config.views == views


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_a_finished_run_calibrates_its_checkpoints_for_the_models_views(classify_run: dict, name: str) -> None:
    """Epochs are validated on one view per image (cheap), the final checkpoints on the model's five."""
    trainer, result = classify_run["trainer"], classify_run["result"]
    calibrated_for(trainer, classify_run["out"] / name, 5)
    history = result.history
    saved = max(history, key=lambda m: (m.val_one_shot, m.val_roc_auc)) if name == "best.pt" else history[-1]
    state = torch.load(classify_run["out"] / name, map_location="cpu", weights_only=True)
    model = SiameseNetwork(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    embeddings = embed_pixels(model, trainer.val_set.pixels, CPU, views=1)  # what chose the epoch
    assert one_shot_accuracy(model, embeddings, trainer.val_episodes).accuracy == saved.val_one_shot
    if name == "best.pt":
        assert state["metrics"] == result.best_with_views.to_dict()


def test_best_and_last_at_the_same_step_are_calibrated_for_views_once(
    small: ImageSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(preset("fast", max_steps=4, batch_size=16, val_pairs=50), small, tmp_path, CPU)
    validate, views_asked, layouts = trainer.validate, [], []

    def counted(views: int | None = None, model: SiameseNetwork | None = None) -> Validation:
        views_asked.append(views)
        kernels = [p for p in (model or trainer.model).parameters() if p.dim() == 4]
        layouts.append(all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels))
        return validate(views, model)

    monkeypatch.setattr(trainer, "validate", counted)
    trainer.fit()
    assert views_asked == [1, None]  # the epoch's one-view validation, then one with the model's views for both
    assert layouts == [True, True]  # the five-view validation embeds in the training layout too (channels-last here)
    for name in ("best.pt", "last.pt"):
        calibrated_for(trainer, tmp_path / name, 5)


def test_a_paused_run_is_calibrated_for_views_when_resumed_to_its_end(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", max_steps=8, batch_size=16, val_pairs=50)
    paused = Trainer(config, small, tmp_path, CPU)
    assert paused.fit(stop_after=5).best_with_views is None
    calibrated_for(paused, tmp_path / "last.pt", 1)  # one view until the end: what its threshold was fitted for
    resumed = Trainer(config, small, tmp_path, CPU)
    result = resumed.fit(resume=tmp_path / "last.pt")
    assert result.best_with_views is not None
    for name in ("best.pt", "last.pt"):
        calibrated_for(resumed, tmp_path / name, 5)


def test_validation_trials_are_within_the_held_out_alphabet(classify_run: dict) -> None:
    trainer = classify_run["trainer"]
    episodes = trainer.val_episodes
    assert episodes.support.shape == (2000, 6, 1)  # the held-out alphabet has 6 characters: 6-way
    val = trainer.val_set
    groups = val.class_groups[val.labels]  # the group of each image
    assert (groups[episodes.support.flatten(1)] == groups[episodes.queries][:, None]).all()
    assert set(val.class_names).isdisjoint(trainer.train_set.class_names)


def test_held_out_classes_that_form_no_trials_select_by_roc_auc(images: ImageSet) -> None:
    one_class_per_group = images.subset_classes(torch.arange(0, 48, 6))  # 8 alphabets, 1 character each
    assert validation_episodes(one_class_per_group, 100, 0) is None
    assert validation_episodes(images, 100, 0, most_ways=20).support.shape == (100, 6, 1)
    assert selection_score(None, 0.9) < selection_score(0.1, 0.5) < selection_score(0.1, 0.6)


def test_max_steps_is_honoured(classify_run: dict) -> None:
    progress = classify_run["progress"]
    assert [p.step for p in progress] == [5, 10, 15, 20, 25, 30]
    assert {p.total_steps for p in progress} == {30}
    assert classify_run["trainer"].step == 30
    assert torch.load(classify_run["out"] / "last.pt", weights_only=True)["training"]["step"] == 30


@pytest.mark.parametrize(("epochs", "max_steps", "total"), [(3, None, 15), (3, 7, 7), (2, 1000, 10)])
def test_total_steps_is_the_smaller_of_epochs_and_max_steps(
    small: ImageSet, tmp_path: Path, epochs: int, max_steps: int | None, total: int
) -> None:
    config = preset("fast", epochs=epochs, max_steps=max_steps, batch_size=16, val_pairs=50)
    trainer = Trainer(config, small, tmp_path, CPU)
    assert (trainer.steps_per_epoch, trainer.total_steps) == (80 // 16, total)


def test_learning_rate_follows_the_scaled_warm_cosine_schedule(classify_run: dict) -> None:
    config = classify_run["config"]
    base = config.lr * config.batch_size / 64
    for report in classify_run["progress"]:
        expected = base * warm_cosine(report.step, 30, config.warmup_fraction, config.min_lr_fraction)
        assert report.lr == pytest.approx(expected)


def test_classify_loss_falls(classify_run: dict) -> None:
    losses = [p.loss for p in classify_run["progress"]]
    assert losses[-1] < 0.75 * losses[0]
    history = classify_run["result"].history
    assert history[1].train_loss < history[0].train_loss


def test_pair_objective_loss_falls(small: ImageSet, tmp_path: Path) -> None:
    config = preset(
        "fast", objective="pair", max_steps=24, batch_size=16, lr=1.0, augment=False, val_pairs=50, log_every=8
    )
    progress: list[Progress] = []
    result = Trainer(config, small, tmp_path / "pair", CPU, on_progress=progress.append).fit()
    losses = [p.loss for p in progress]
    assert len(losses) == 3
    assert losses[-1] < losses[0] - 0.02
    assert losses[-1] < math.log(2)  # better than a 50/50 guess
    assert result.history[-1].step == 24
    assert torch.load(result.last_checkpoint, weights_only=True)["training"]["classifier"] is None


def test_wide_preset_trains_the_fast_network_with_more_channels(small: ImageSet, tmp_path: Path) -> None:
    config = preset("wide", max_steps=2, batch_size=16, val_pairs=50)
    result = Trainer(config, small, tmp_path / "run", CPU).fit()
    state = torch.load(result.best_checkpoint, weights_only=True)
    wide = ModelConfig(
        "fast", input_px=28, width=64, blocks=4, normalize=True, final_pool=False, views=5, widen=2, frame=0.8
    )
    assert state["model_config"] == wide.to_dict()
    assert state["model"]["head.weight"].shape == (1, 512 * 3 * 3)


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("width", 0, "width=0: must be at least 1"),
    ("widen", 0, "widen=0: must be at least 1"),
    ("val_pairs", 5, "val_pairs=5: must be at least 10"),  # "must be positive" before
    ("val_fraction", 1.5, "val_fraction=1.5: must be between 0 and 1, both excluded"),  # refused by the split before
    ("val_fraction", 0.0, "val_fraction=0.0: must be between 0 and 1, both excluded"),
])
def test_settings_out_of_range_are_refused_with_their_bound(setting: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"invalid setting {message}")):
        preset("fast", **{setting: value})


def test_a_misspelled_preset_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="TrainConfig has no setting 'epoch', 'lrate'"):
        preset("fast", lrate=0.1, epoch=3)  # a TypeError before


@pytest.mark.parametrize("name", ["fast", "koch"])
def test_training_steps_feed_the_distorted_batch_to_the_backbone_as_it_is(
    name: str, small: ImageSet, tmp_path: Path
) -> None:
    """Batches are framed when staged and distorted after: the objectives must not frame them again."""
    config = preset(name, frame=0.8, val_pairs=20, batch_size=4, input_px=28 if name == "fast" else 105)
    trainer = Trainer(config, small, tmp_path, CPU)
    seen = []
    trainer.model.embedding.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    order = torch.arange(len(small))
    trainer.train_step(order, seeded_generator(5))
    if name == "fast":
        expected = trainer.batch(order[:4], seeded_generator(5))
    else:  # the pair objective: the sampler's pairs first, from the same stream
        generator = seeded_generator(5)
        pairs = trainer.sampler.sample(4, generator)
        expected = trainer.batch(torch.cat([pairs.first, pairs.second]), generator)
    torch.testing.assert_close(seen[0], expected)


def test_training_batches_are_bent_by_the_configured_elastic_strength(small: ImageSet, tmp_path: Path) -> None:
    index = torch.arange(8)
    batches = {}
    for elastic in (0.0, 0.15):
        config = preset("fast", elastic=elastic, val_pairs=20, batch_size=8)
        trainer = Trainer(config, small, tmp_path / str(elastic), CPU)
        batches[elastic] = trainer.batch(index, seeded_generator(5))
        ink = trainer.staged.gather(index).float().div_(255)
        expected = F.avg_pool2d(random_distortion(ink, seeded_generator(5), elastic=elastic), 3)
        assert torch.allclose(batches[elastic], expected)
    assert not torch.allclose(batches[0.0], batches[0.15])


def ink_sharpness(images: torch.Tensor) -> float:
    """Σ ink² / Σ ink: 1 for pure black-and-white strokes, lower as blur spreads them into grey."""
    return float((images**2).sum() / images.sum())


def test_supersampled_distortions_keep_strokes_as_sharp_as_evaluation_images(images: ImageSet, tmp_path: Path) -> None:
    index = torch.arange(0, 300, 3)
    sharpness = {}
    for factor in (1, 3):
        trainer = Trainer(preset("fast", supersample=factor, val_pairs=20), images, tmp_path / str(factor), CPU)
        assert trainer.staged.ink.shape[-1] == 28 * factor
        batch = trainer.batch(index, seeded_generator(5))
        assert batch.shape == (len(index), 1, 28, 28)
        sharpness[factor] = ink_sharpness(batch)
    clean = ink_sharpness(trainer.model.embedding.to_input(to_ink(trainer.train_set.pixels[index]), 28))  # as in eval
    assert abs(sharpness[3] / clean - 1) < 0.05
    assert sharpness[1] / clean < 0.9  # distorting at 28 px blurs the strokes


def test_without_augmentation_training_images_are_staged_at_the_input_size(small: ImageSet, tmp_path: Path) -> None:
    trainer = Trainer(preset("fast", augment=False, val_pairs=20, batch_size=8), small, tmp_path, CPU)
    index = torch.arange(5)
    assert trainer.staged.ink.shape[-1] == 28
    assert torch.equal(trainer.batch(index, seeded_generator(5)), trainer.staged.gather(index).float() / 255)


def test_distortions_are_never_drawn_finer_than_the_images(small: ImageSet, tmp_path: Path) -> None:
    assert small.pixels.shape[-1] == 105
    for input_px, staged_px in ((40, 120), (105, 105)):  # 3 × 40 px; 105 px needs no finer grid
        config = preset("fast", input_px=input_px, val_pairs=20, batch_size=8)
        trainer = Trainer(config, small, tmp_path / str(input_px), CPU)
        assert trainer.staged.ink.shape[-1] == staged_px
        assert trainer.batch(torch.arange(4), seeded_generator(5)).shape == (4, 1, input_px, input_px)


def test_supersample_must_be_positive_and_old_checkpoints_resume_without_it() -> None:
    with pytest.raises(ConfigError, match="invalid setting supersample=0: must be at least 1"):
        preset("fast", supersample=0)
    older = preset("fast").to_dict()
    del older["supersample"]
    assert TrainConfig.from_dict(older).supersample == 1  # as it was trained


@pytest.mark.parametrize("elastic", [-0.1, float("nan"), float("inf")])
def test_elastic_must_be_a_number_not_below_zero(elastic: float) -> None:
    with pytest.raises(ConfigError, match=f"invalid setting elastic={elastic!r}: must be a finite number ≥ 0"):
        preset("fast", elastic=elastic)


@pytest.mark.parametrize(("setting", "value", "told"), [
    ("weight_decay", -1e-4, "must be a finite number ≥ 0"),
    ("warmup_fraction", -1.0, "must be between 0 and 1"),
    ("min_lr_fraction", float("nan"), "must be between 0 and 1"),  # the schedule's lr became NaN: "lower --lr"
    ("within_alphabet", 1.5, "must be between 0 and 1"),
    ("momentum", 0.0, "must be between 0 and 1, both excluded"),  # torch's ValueError about Nesterov momentum before
    ("momentum", 1.0, "must be between 0 and 1, both excluded"),
])
def test_optimiser_schedule_and_negative_settings_out_of_range_are_config_errors(setting, value, told) -> None:
    with pytest.raises(ConfigError, match=f"invalid setting {setting}={value!r}: {told}"):
        preset("fast", **{setting: value})


def test_a_checkpoint_from_before_elastic_distortion_resumes_without_it() -> None:
    older = preset("fast").to_dict()
    del older["elastic"]
    assert TrainConfig.from_dict(older).elastic == 0.0  # as it was trained
    assert TrainConfig.from_dict(preset("fast").to_dict()) == preset("fast")


def test_a_run_from_before_views_resumes_with_one_view(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", max_steps=8, batch_size=16, val_pairs=50)
    Trainer(config, small, tmp_path, CPU).fit(stop_after=5)
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    for written_before_views in (state["train_config"], state["model_config"]):
        del written_before_views["views"]
    del state["calibrated_views"]
    torch.save(state, tmp_path / "last.pt")
    older = TrainConfig.from_dict(state["train_config"])
    assert older.views == 1
    resumed = Trainer(older, small, tmp_path, CPU)
    result = resumed.fit(resume=tmp_path / "last.pt")
    assert resumed.model.config.views == 1 and result.best_with_views is None
    assert Verifier.from_checkpoint(tmp_path / "last.pt", "cpu").model.config.views == 1


def test_a_run_of_the_former_fast_network_resumes_with_its_network(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", width=64, widen=1, max_steps=8, batch_size=16, val_pairs=50)
    Trainer(config, small, tmp_path, CPU).fit(stop_after=5)
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    # as written when the fast backbone had 64 channels in every block: no widen, width left to the backbone
    del state["train_config"]["widen"], state["model_config"]["widen"]
    state["train_config"]["width"] = None
    torch.save(state, tmp_path / "last.pt")
    resumed = Trainer(resume_config(tmp_path / "last.pt"), small, tmp_path, CPU)
    resumed.fit(resume=tmp_path / "last.pt")
    assert resumed.model.config.width == 64 and resumed.model.config.widen == 1
    assert resumed.step == 8
    assert Verifier.from_checkpoint(tmp_path / "last.pt", "cpu").model.embedding_dim == 64 * 3 * 3


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [("width", "64", "'>=' not supported"), ("layers", 3, "unknown model settings ['layers']")],
)
def test_a_checkpoint_whose_model_config_cannot_be_used_is_refused_by_resume(
    classify_run: dict, tmp_path: Path, setting: str, value: object, reason: str
) -> None:
    state = torch.load(classify_run["out"] / "last.pt", map_location="cpu", weights_only=True)
    state["model_config"][setting] = value
    torch.save(state, tmp_path / "last.pt")
    message = f"{tmp_path / 'last.pt'}: its training settings cannot be used ({reason}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        resume_config(tmp_path / "last.pt")


def float16_steps(small: ImageSet, out: Path, fused: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """The first weight after an overflowed first step, an ordinary one and another overflowed one, taken with a
    loss scaler as float16 training on cuda has one; and the reads of a tensor's value on the host meanwhile."""
    monkeypatch.setattr(devices, "fuses_optimizer", lambda device: fused)
    empty_like = torch.empty_like  # memory torch leaves unwritten holds NaN here, not whatever it held before
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: empty_like(*args, **kwargs).fill_(math.nan))
    trainer = Trainer(preset("fast", max_steps=3, batch_size=16, val_pairs=50), small, out, CPU)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    weight = next(trainer.model.parameters())
    reads: list[str] = []
    with monkeypatch.context() as reading:
        for name in ("item", "__bool__", "tolist"):
            read = getattr(torch.Tensor, name)
            reading.setattr(torch.Tensor, name, lambda self, read=read, name=name: reads.append(name) or read(self))
        weights = [weight.detach().clone()]
        for loss in (lambda: weight.float().sum() * math.inf, lambda: weight.float().square().sum(),
                     lambda: weight.float().sum() * math.inf):
            trainer.optimize(loss)
            weights.append(weight.detach().clone())
    assert trainer.scaler.get_scale() == 2.0**6  # halved at each overflow
    return weights, reads


def test_float16_steps_skip_overflows_on_the_device_and_step_as_the_unfused_optimizer(
    small: ImageSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        weights, reads = float16_steps(small, tmp_path / "fused", True, monkeypatch)
        unfused, unfused_reads = float16_steps(small, tmp_path / "unfused", False, monkeypatch)
    # unfused, the skipped first step made torch warn that the schedule stepped before the optimizer
    assert [str(warning.message) for warning in warned] == []
    assert reads == [] and unfused_reads  # unfused, the scaler read whether the gradients overflowed every step
    before, skipped, stepped, skipped_again = weights
    assert torch.equal(skipped, before) and torch.equal(skipped_again, stepped) and not torch.equal(stepped, before)
    # a skipped first step left the fused kernel's momentum unwritten: the next step made the weights NaN
    torch.testing.assert_close(stepped, unfused[2])


def test_a_checkpoint_saved_on_sdaa_resumes_fused_as_unfused(
    small: ImageSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = preset("fast", max_steps=8, batch_size=16, val_pairs=50)
    with monkeypatch.context() as on_sdaa:  # as sdaa trains: contiguous weights and momentum, torch's default SGD
        on_sdaa.setattr(devices, "memory_format", lambda device: torch.contiguous_format)
        on_sdaa.setattr(devices, "fuses_optimizer", lambda device: False)
        Trainer(config, small, tmp_path / "sdaa", CPU).fit(stop_after=5)
    resumed = {}
    for fused in (True, False):
        monkeypatch.setattr(devices, "fuses_optimizer", lambda device, fused=fused: fused)
        out = tmp_path / str(fused)
        out.mkdir()
        shutil.copy(tmp_path / "sdaa" / "last.pt", out / "last.pt")
        trainer = Trainer(config, small, out, CPU)
        trainer.fit(resume=out / "last.pt")
        assert [group["fused"] for group in trainer.optimizer.param_groups] == [fused]
        resumed[fused] = state_of(trainer)
    # fused, a contiguous momentum was read as if channels-last: weights off by about 3e-3 after 3 steps
    torch.testing.assert_close(resumed[True], resumed[False])


@pytest.mark.parametrize("saved_fused", [True, False])
def test_a_resumed_optimizer_steps_with_this_devices_kernel(
    small: ImageSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved_fused: bool
) -> None:
    config = preset("fast", max_steps=8, batch_size=16, val_pairs=50)
    Trainer(config, small, tmp_path, CPU).fit(stop_after=5)
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    for group in state["training"]["optimizer"]["param_groups"]:
        group["fused"] = saved_fused  # as saved on cuda (fused) or sdaa and by earlier versions (not)
    torch.save(state, tmp_path / "last.pt")
    monkeypatch.setattr(devices, "fuses_optimizer", lambda device: not saved_fused)  # the other kind of device
    resumed = Trainer(config, small, tmp_path, CPU)
    resumed.fit(resume=tmp_path / "last.pt")
    assert [group["fused"] for group in resumed.optimizer.param_groups] == [not saved_fused] * len(
        resumed.optimizer.param_groups
    )
    assert resumed.step == 8


def test_refuses_to_overwrite_a_run(classify_run: dict, small: ImageSet) -> None:
    out = classify_run["out"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match=r"already holds checkpoints; pass --resume .*last\.pt"):
        Trainer(preset("fast", max_steps=1, batch_size=16, val_pairs=50), small, out, CPU).fit()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_out_dir_that_is_a_file_is_refused(small: ImageSet, tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(OutputError, match="is a file"):
        Trainer(preset("fast", max_steps=1, batch_size=16, val_pairs=50), small, tmp_path / "run", CPU).fit()


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return trainer.model.state_dict() | {f"classifier.{k}": v for k, v in trainer.classifier.state_dict().items()}


@pytest.mark.parametrize(
    ("stop_at", "schedule"),
    [
        # a crash after the epoch-1 checkpoint (step 5 of 8): same config both times, warm-up + cosine
        (None, {}),
        # a run stopped by --max-steps 3 (mid-epoch), then resumed with --max-steps 8; a flat schedule,
        # because the warm-up + cosine schedule is stretched over max_steps and so differs between 3 and 8
        (3, {"warmup_fraction": 0.0, "min_lr_fraction": 1.0}),
    ],
    ids=["crash-after-epoch", "max-steps-mid-epoch"],
)
def test_resume_gives_the_uninterrupted_weights(
    small: ImageSet, tmp_path: Path, stop_at: int | None, schedule: dict
) -> None:
    config = preset("fast", max_steps=8, batch_size=16, val_pairs=50, log_every=2, **schedule)
    uninterrupted = Trainer(config, small, tmp_path / "whole", CPU)
    uninterrupted.fit()

    out = tmp_path / "pieces"
    if stop_at is None:

        def crash(metrics: EpochMetrics) -> None:
            raise Interrupted

        with pytest.raises(Interrupted):
            Trainer(config, small, out, CPU, on_epoch=crash).fit()
    else:
        Trainer(replace(config, max_steps=stop_at), small, out, CPU).fit()
    assert torch.load(out / "last.pt", weights_only=True)["training"]["step"] == (stop_at or 5)

    resumed = Trainer(config, small, out, CPU)
    result = resumed.fit(resume=out / "last.pt")
    assert resumed.step == 8
    assert result.history[-1].step == 8
    expected = state_of(uninterrupted)
    assert state_of(resumed).keys() == expected.keys()
    for name, tensor in state_of(resumed).items():
        assert torch.equal(tensor, expected[name]), name  # bit for bit on the CPU
    assert result.history[-1].val_roc_auc == uninterrupted.history[-1].val_roc_auc


def test_resume_refuses_the_folder_of_another_run(classify_run: dict, images: ImageSet, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pt").write_bytes(b"another run's checkpoint")
    trainer = Trainer(resume_config(classify_run["out"] / "last.pt"), images, other, CPU)
    with pytest.raises(OutputError, match=r"other: already holds checkpoints"):
        trainer.fit(resume=classify_run["out"] / "last.pt")
    assert [p.name for p in other.iterdir()] == ["last.pt"]
    assert (other / "last.pt").read_bytes() == b"another run's checkpoint"


def test_a_run_resumed_in_a_new_folder_takes_its_best_epoch_along(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", max_steps=10, batch_size=16, val_pairs=50)  # two epochs of 5 steps
    Trainer(config, small, tmp_path / "first", CPU).fit()
    result = Trainer(config, small, tmp_path / "second", CPU).fit(resume=tmp_path / "first" / "last.pt")
    assert result.best_checkpoint == tmp_path / "second" / "best.pt"
    found, expected = (load_checkpoint(tmp_path / run / "best.pt") for run in ("second", "first"))
    assert found["training"]["step"] == expected["training"]["step"] == 5  # the first epoch: carried, not last.pt
    assert found["model"].keys() == expected["model"].keys()
    assert all(torch.equal(found["model"][name], expected["model"][name]) for name in expected["model"])


def test_resume_through_a_linked_checkpoint_goes_on_in_the_link_s_folder(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", max_steps=10, batch_size=16, val_pairs=50)
    Trainer(config, small, tmp_path / "run", CPU).fit(stop_after=5)
    (tmp_path / "store").mkdir()
    (tmp_path / "run" / "last.pt").rename(tmp_path / "store" / "kept.pt")
    (tmp_path / "run" / "last.pt").symlink_to(tmp_path / "store" / "kept.pt")
    resumed = Trainer(config, small, tmp_path / "run", CPU)
    resumed.fit(resume=tmp_path / "run" / "last.pt")
    assert resumed.step == 10 and load_checkpoint(tmp_path / "run" / "last.pt")["training"]["step"] == 10


def test_resume_with_another_objective_is_refused(classify_run: dict, small: ImageSet, tmp_path: Path) -> None:
    trainer = Trainer(preset("fast", objective="pair", max_steps=8, batch_size=16, val_pairs=50), small, tmp_path, CPU)
    with pytest.raises(CheckpointError, match="another objective"):
        trainer.fit(resume=classify_run["out"] / "last.pt")


@pytest.mark.parametrize(
    ("step", "factor"),
    # total 105 steps, 5 % warm-up = 5 steps, then cosine from 1 to 0.01 over the remaining 100
    [(0, 0.2), (1, 0.4), (4, 1.0), (5, 1.0), (55, 0.505), (105, 0.01), (500, 0.01)],
)
def test_warm_cosine_values(step: int, factor: float) -> None:
    assert warm_cosine(step, 105, 0.05, 0.01) == pytest.approx(factor)


def test_warm_cosine_rises_then_falls() -> None:
    factors = [warm_cosine(step, 200, 0.1, 0.05) for step in range(200)]
    assert factors.index(max(factors)) == 19 and max(factors) == 1.0
    assert all(a < b for a, b in pairwise(factors[:20]))
    assert all(a >= b for a, b in pairwise(factors[19:]))
    assert warm_cosine(0, 10, 0.0, 1.0) == warm_cosine(7, 10, 0.0, 1.0) == 1.0


def test_calibrate_head_fits_a_scaled_l1_distance(classify_run: dict) -> None:
    trainer = classify_run["trainer"]
    model = copy.deepcopy(trainer.model)
    pairs = trainer.calibration_pairs
    embeddings = embed_pixels(model, trainer.val_set.pixels, CPU)
    distance = (embeddings[pairs.first] - embeddings[pairs.second]).abs().sum(1)
    target = pairs.same.float()

    def bce(scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(bias - scale * distance, target)

    initial = bce(1 / distance.std(), distance.mean() / distance.std())  # logit = −(d − mean) / std
    calibrate_head(model, embeddings, pairs)
    weight, bias = model.head.weight.detach(), model.head.bias.detach()
    assert torch.all(weight == weight[0, 0]) and weight[0, 0] < 0  # one negative weight on Σ|e1 − e2|
    scale = (-weight[0, 0]).clone().requires_grad_()
    offset = bias[0].clone().requires_grad_()
    fitted = bce(scale, offset)
    fitted.backward()
    assert fitted.item() < initial.item()
    assert fitted.item() < math.log(2)
    # an optimum: no slope left (the scale's gradient in the units of the standardised distance)
    assert abs(float(scale.grad / distance.std())) < 1e-3 and abs(float(offset.grad)) < 1e-3
    logits = model.score_embeddings(embeddings[pairs.first], embeddings[pairs.second])
    assert roc_auc(logits, pairs.same) == pytest.approx(roc_auc(-distance, pairs.same))


def test_calibrate_head_refuses_a_two_layer_head(classify_run: dict) -> None:
    model = copy.deepcopy(classify_run["trainer"].model)
    model.head = nn.Sequential(nn.Linear(64, 512), nn.Linear(512, 1))  # the vgg16 head
    embeddings = torch.rand(10, 64)
    with pytest.raises(TrainingError, match="use the pair objective"):
        calibrate_head(model, embeddings, classify_run["trainer"].calibration_pairs)


@pytest.fixture(scope="module")
def averaged_run(images: ImageSet, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three epochs of the default preset, every epoch's weights kept, to check what best.pt averages."""
    config = preset("fast", epochs=3, batch_size=32, val_pairs=50, log_every=5)
    weights: dict[int, dict] = {}

    def keep(metrics: EpochMetrics) -> None:
        weights[metrics.epoch] = copy.deepcopy(trainer.model.state_dict())

    trainer = Trainer(config, images, tmp_path_factory.mktemp("averaged") / "run", CPU, on_epoch=keep)
    return {"trainer": trainer, "result": trainer.fit(), "weights": weights}


def _with_scores(trainer: Trainer, score: list[float]) -> list[dict]:
    """The trainer's best epochs, each given ``score``; returns the real ones, to put back."""
    kept = trainer.top_epochs
    trainer.top_epochs = [entry | {"score": score} for entry in kept]
    return kept


def test_the_two_best_epochs_are_kept_in_every_checkpoint(averaged_run: dict) -> None:
    result = averaged_run["result"]
    ranked = sorted(result.history, key=lambda m: m.score, reverse=True)  # stable: the earlier epoch wins a tie
    kept = load_checkpoint(result.last_checkpoint)["training"]["top_epochs"]
    assert [e["epoch"] for e in kept] == [m.epoch for m in ranked[:2]]
    assert [e["score"] for e in kept] == [list(m.score) for m in ranked[:2]]
    for entry in kept:
        torch.testing.assert_close(entry["model"], averaged_run["weights"][entry["epoch"]])
    # a run whose average validated no higher keeps the best epoch's own weights
    best = load_checkpoint(result.best_checkpoint)
    assert (result.averaged is None) == ("averaged_epochs" not in best)


def test_best_checkpoint_takes_the_average_of_the_two_best_epochs(averaged_run: dict, tmp_path: Path) -> None:
    trainer, weights = averaged_run["trainer"], averaged_run["weights"]
    best = tmp_path / "best.pt"
    best.write_bytes(averaged_run["result"].best_checkpoint.read_bytes())
    kept = _with_scores(trainer, [0.0, 0.0])  # any average validates higher than that
    try:
        val = trainer._average_best(best)
    finally:
        trainer.top_epochs = kept
    top = [entry["epoch"] for entry in kept]
    state = load_checkpoint(best)
    assert val is not None and state["averaged_epochs"] == top
    assert state["metrics"] == val.to_dict() and state["threshold"] == val.pairs.threshold
    backbone = [name for name in state["model"] if name.startswith("embedding.")]
    assert any("running_mean" in name for name in backbone)  # batch-norm statistics are averaged too
    for name in backbone:
        first, second = weights[top[0]][name], weights[top[1]][name]
        expected = (first.double() + second.double()) / 2 if first.is_floating_point() else first
        torch.testing.assert_close(state["model"][name], expected.to(first.dtype))


def test_an_average_that_validates_no_higher_leaves_best_checkpoint_alone(averaged_run: dict, tmp_path: Path) -> None:
    trainer = averaged_run["trainer"]
    best = tmp_path / "best.pt"
    best.write_bytes(averaged_run["result"].best_checkpoint.read_bytes())
    before = best.read_bytes()
    kept = _with_scores(trainer, [1.0, 1.0])  # no average validates higher than that
    try:
        assert trainer._average_best(best) is None
    finally:
        trainer.top_epochs = kept
    assert best.read_bytes() == before


def test_without_averaging_best_checkpoint_holds_the_best_epoch(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", max_steps=6, batch_size=32, val_pairs=50, average_best=1)
    weights: dict[int, dict] = {}
    trainer = Trainer(config, small, tmp_path / "run", CPU,
                      on_epoch=lambda m: weights.setdefault(m.epoch, copy.deepcopy(trainer.model.state_dict())))
    result = trainer.fit()
    best_epoch = result.best_epoch.epoch
    best = load_checkpoint(result.best_checkpoint)
    assert result.averaged is None and "averaged_epochs" not in best and best["training"]["top_epochs"] == []
    for name, tensor in best["model"].items():
        if name.startswith("embedding."):
            torch.testing.assert_close(tensor, weights[best_epoch][name])
    # the earlier of a tie, and never a pause's validation, as training chooses
    first, *_ = result.history
    tied = replace(result, history=(replace(first, epoch=1), replace(first, epoch=2), replace(first, epoch=3,
                                    val_one_shot=1.0, paused=True)))
    assert tied.best_epoch.epoch == 1
    assert replace(result, history=()).best_epoch is None


def test_reference_presets_and_old_checkpoints_keep_the_best_epoch_alone() -> None:
    assert preset("seed").average_best == preset("koch").average_best == 1
    assert preset("fast").average_best == 2
    assert TrainConfig.from_dict(asdict(preset("fast")) | {"average_best": 3}).average_best == 3
    before_averaging = {k: v for k, v in asdict(preset("fast")).items() if k != "average_best"}
    assert TrainConfig.from_dict(before_averaging).average_best == 1
    with pytest.raises(ConfigError, match="average_best"):
        preset("fast", average_best=0)


def test_a_run_extended_past_an_averaged_end_goes_back_to_its_best_epoch(averaged_run: dict, tmp_path: Path) -> None:
    trainer, result = averaged_run["trainer"], averaged_run["result"]
    best = tmp_path / "best.pt"
    best.write_bytes(result.best_checkpoint.read_bytes())
    kept = _with_scores(trainer, [0.0, 0.0])  # the first end: the average validated higher
    try:
        assert trainer._average_best(best) is not None
        _with_scores(trainer, [1.0, 1.0])  # the later end: it does not
        assert trainer._average_best(best) is None
    finally:
        trainer.top_epochs = kept
    state = load_checkpoint(best)
    best_epoch = max(result.history, key=lambda m: m.score)
    assert "averaged_epochs" not in state and state["calibrated_views"] == 1
    assert state["threshold"] == best_epoch.threshold and state["metrics"]["one_shot"] == best_epoch.val_one_shot
    for name, tensor in state["model"].items():
        if name.startswith("embedding."):
            torch.testing.assert_close(tensor, averaged_run["weights"][best_epoch.epoch][name])
