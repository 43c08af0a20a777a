"""Staging and compilation: where training images live, the host-memory path for data sets too large for
the device, and ``--compile``, each against the plain device-resident run on real Omniglot."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from siamese_omniglot import devices, staging
from siamese_omniglot.checkpoint import load_checkpoint
from siamese_omniglot.config import preset
from siamese_omniglot.data import ImageSet, load_folder
from siamese_omniglot.errors import ConfigError
from siamese_omniglot.staging import StagedImages, choose_placement, staged_bytes
from siamese_omniglot.train import Trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(mini_background: Path) -> ImageSet:
    return load_folder(mini_background)


def test_host_and_device_placements_hold_the_same_images(images: ImageSet) -> None:
    on_device = StagedImages(images.pixels, 40, CPU, "device")
    on_host = StagedImages(images.pixels, 40, CPU, "host")
    assert (on_device.placement, on_host.placement) == ("device", "host")
    assert on_device.ink.shape == (len(images), 1, 40, 40) and on_device.ink.dtype == torch.uint8
    index = torch.tensor([5, 0, 5, len(images) - 1])
    assert torch.equal(on_host.gather(index), on_device.gather(index))
    # ink, not paper: the background of Omniglot's white pages is 0
    assert on_device.ink[:, :, 0, 0].max() == 0 and on_device.ink.max() == 255


@pytest.mark.parametrize(("free", "expected"), [(None, "device"), (10**9, "device"), (2 * 1000 * 40 * 40 - 1, "host")])
def test_auto_keeps_images_on_the_device_only_when_they_fit_in_half_its_free_memory(
    monkeypatch: pytest.MonkeyPatch, free: int | None, expected: str
) -> None:
    monkeypatch.setattr(devices, "free_memory", lambda device: free)
    assert staged_bytes(1000, 40) == 1000 * 40 * 40
    assert choose_placement(1000, 40, torch.device("cuda", 0)) == expected


def test_falling_back_to_host_memory_says_why(monkeypatch: pytest.MonkeyPatch, caplog, images: ImageSet) -> None:
    monkeypatch.setattr(devices, "free_memory", lambda device: 10_000)
    with caplog.at_level(logging.WARNING, logger=staging.__name__):
        staged = StagedImages(images.pixels, 40, CPU)
    assert staged.placement == "host"
    needed = len(images) * 40 * 40 / 1e9
    assert f"the training images need {needed:.2f} GB at 40 px but cpu has 0.00 GB free" in caplog.text
    assert "--staging device" in caplog.text


def test_explicit_placement_overrides_the_memory_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "free_memory", lambda device: 1)
    assert choose_placement(1000, 40, CPU, "device") == "device"
    assert choose_placement(1000, 40, CPU, "host") == "host"


def test_unknown_placement_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown --staging 'disk': choose one of auto, device, host"):
        choose_placement(10, 40, CPU, "disk")


def test_cpu_reports_no_memory_limit_and_convolutions_run_channels_last() -> None:
    assert devices.free_memory(CPU) is None
    assert devices.memory_format(torch.device("cuda", 0)) == devices.memory_format(CPU) == torch.channels_last


def train_weights(images: ImageSet, out: Path, **options) -> torch.Tensor:
    """The flattened weights after 4 steps of a small fast-preset run (no distortions: exact comparisons)."""
    config = preset("fast", max_steps=4, batch_size=16, val_pairs=20, augment=False, input_px=24, log_every=2)
    trainer = Trainer(config, images.subset_classes(torch.arange(10)), out, CPU, **options)
    trainer.fit()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_host_staged_training_equals_device_staged_training(images: ImageSet, tmp_path: Path) -> None:
    device_run = train_weights(images, tmp_path / "device", staging="device")
    host_run = train_weights(images, tmp_path / "host", staging="host")
    assert torch.equal(device_run, host_run)


def test_compiled_training_matches_eager_training(mini_background: Path, run_siamese, tmp_path: Path) -> None:
    """``siamese train --compile`` (in a fresh process: torch.compile must not see other tests' fakes) trains the
    same model as eager mode, up to the rounding of fused kernels, which a few SGD steps amplify."""
    options = ("train", "--data", mini_background, "--device", "cpu", "--max-steps", 4, "--batch-size", 16)
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        result = run_siamese(*options, *extra, "--out", tmp_path / name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    eager, compiled = (load_checkpoint(tmp_path / name / "last.pt") for name in ("eager", "compiled"))
    assert compiled["metrics"]["loss"] == pytest.approx(eager["metrics"]["loss"], rel=0.02)
    assert compiled["training"]["history"][0]["train_loss"] == pytest.approx(
        eager["training"]["history"][0]["train_loss"], rel=2e-3)
    assert eager["model"].keys() == compiled["model"].keys()  # the plain model's names: no compiled wrapper
    for name, tensor in eager["model"].items():
        if tensor.is_floating_point():
            scale = tensor.abs().max()
            assert (compiled["model"][name] - tensor).abs().max() <= 0.05 * scale + 5e-4, name


def test_trainer_refuses_compile_where_the_device_cannot(
    monkeypatch: pytest.MonkeyPatch, images: ImageSet, tmp_path: Path
) -> None:
    monkeypatch.setattr(devices, "can_compile", lambda device: False)  # the cpu standing in for an sdaa card
    with pytest.raises(ConfigError, match="--compile is not supported on cpu"):
        Trainer(preset("fast", max_steps=1), images, tmp_path / "run", CPU, compile=True)
    assert not (tmp_path / "run").exists()


def test_can_compile_everywhere_but_sdaa() -> None:
    if torch._C._get_privateuse1_backend_name() != "sdaa":
        torch.utils.rename_privateuse1_backend("sdaa")  # allowed once per process; lets torch.device("sdaa") exist
    assert devices.can_compile(CPU) and devices.can_compile(torch.device("cuda", 0))
    assert not devices.can_compile(torch.device("sdaa", 0))


def test_cli_refuses_an_unknown_staging_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "siamese_omniglot", "train", "--staging", "disk", "--data", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown --staging 'disk': choose one of auto, device, host"]
