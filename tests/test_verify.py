"""The Verifier: loading a trained checkpoint, scoring pairs of image files or arrays, deciding by threshold."""

from __future__ import annotations

import io
import json
import re
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_omniglot.checkpoint import load_checkpoint, save_checkpoint
from siamese_omniglot.config import preset
from siamese_omniglot.data import decode_image, load_folder, read_image
from siamese_omniglot.errors import CheckpointError, DataError, DeviceError
from siamese_omniglot.models import ModelConfig, SiameseNetwork, build_model
from siamese_omniglot.train import Trainer
from siamese_omniglot.verify import BUNDLED_CHECKPOINT, Comparison, Verifier, default_checkpoint


@pytest.fixture(scope="module")
def checkpoint(mini_background: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = preset("fast", max_steps=10, batch_size=32, val_pairs=50, log_every=5)
    out = tmp_path_factory.mktemp("verify") / "run"
    return Trainer(config, load_folder(mini_background), out, torch.device("cpu")).fit().best_checkpoint


@pytest.fixture(scope="module")
def verifier(checkpoint: Path) -> Verifier:
    return Verifier.from_checkpoint(checkpoint, "cpu")


@pytest.fixture(scope="module")
def characters(mini_evaluation: Path) -> list[list[Path]]:
    """Image paths of 6 unseen characters (two per alphabet), 3 drawings each."""
    folders = sorted(p for p in mini_evaluation.glob("*/*") if p.is_dir())[::3]
    return [sorted(folder.glob("*.png"))[:3] for folder in folders]


def test_from_checkpoint_uses_the_stored_model_and_threshold(checkpoint: Path, verifier: Verifier) -> None:
    state = load_checkpoint(checkpoint)
    assert verifier.threshold == state["threshold"]
    assert verifier.device == torch.device("cpu")
    assert not verifier.model.training
    assert verifier.model.config.to_dict() == state["model_config"]
    stored = SiameseNetwork(ModelConfig.from_dict(state["model_config"]))
    stored.load_state_dict(state["model"])
    ink = torch.rand(6, 1, 105, 105, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the stored weights, with batch norms folded into the convolutions
        torch.testing.assert_close(verifier.model.embed(ink), stored.eval().embed(ink), atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in verifier.model.modules())


def test_compare_returns_a_decided_comparison(verifier: Verifier, characters: list[list[Path]]) -> None:
    for first, second in [(characters[0][0], characters[0][1]), (characters[0][0], characters[1][0])]:
        result = verifier.compare(first, second)
        assert isinstance(result, Comparison)
        assert 0 <= result.score <= 1
        assert result.same == (result.score >= verifier.threshold)
        assert result.threshold == verifier.threshold
        assert result.to_dict() == {"score": result.score, "same": result.same, "threshold": result.threshold}


def test_score_is_symmetric(verifier: Verifier, characters: list[list[Path]]) -> None:
    a, b = characters[2][0], characters[3][1]
    assert verifier.score(a, b) == pytest.approx(verifier.score(b, a), abs=1e-6)


def test_identical_images_score_at_least_as_high_as_other_characters(
    verifier: Verifier, characters: list[list[Path]]
) -> None:
    images = [drawings[0] for drawings in characters]
    identical = [verifier.score(image, image) for image in images]
    different = [verifier.score(a, b) for a, b in pairwise(images)]
    assert np.mean(identical) >= np.mean(different)
    assert min(identical) == pytest.approx(max(identical), abs=1e-6)  # distance 0 always gives the same score


def test_paths_and_arrays_give_the_same_score(verifier: Verifier, characters: list[list[Path]]) -> None:
    first, second = characters[4][0], characters[4][1]
    by_path = verifier.score(first, second)
    assert verifier.score(str(first), str(second)) == by_path
    assert verifier.score(read_image(first), read_image(second)) == pytest.approx(by_path, abs=1e-6)
    assert verifier.score(first, torch.tensor(read_image(second))) == pytest.approx(by_path, abs=1e-6)


def test_light_on_dark_images_are_warned_of_by_name_in_one_line(
    verifier: Verifier, characters: list[list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inverted = tmp_path / "inverted.png"
    Image.fromarray(255 - read_image(characters[4][0])).save(inverted)
    with caplog.at_level("WARNING", logger="siamese_omniglot"):
        verifier.compare(characters[4][0], characters[4][1])
        verifier.pixels([inverted])  # decoding alone (a figure's) tells nothing, so a compare --plot tells once
        assert caplog.messages == []  # an Omniglot drawing is at most about a fifth ink
        verifier.compare(inverted, 255 - read_image(characters[4][1]))
    assert len(caplog.messages) == 1, caplog.messages
    assert re.fullmatch(rf"mostly dark, so read as mostly ink: {re.escape(str(inverted))} \(\d+%\), image 1 \(\d+%\); "
                        r"the network reads strokes as dark on light paper: .*", caplog.messages[0])


def test_an_array_of_another_size_is_fitted_like_a_file(verifier: Verifier, characters: list[list[Path]]) -> None:
    """An array is taken as the picture it is: scored like a PNG file holding those pixels."""
    first, second = characters[5][0], characters[5][1]
    enlarged = np.asarray(Image.open(second).convert("L").resize((160, 120), Image.NEAREST))
    png = io.BytesIO()
    Image.fromarray(enlarged).save(png, format="PNG")
    as_file = decode_image(png.getvalue(), "enlarged.png")
    assert verifier.score(first, enlarged) == pytest.approx(verifier.score(first, as_file), abs=1e-6)


def test_a_batch_array_is_fitted_like_its_images_one_by_one(verifier: Verifier, characters: list[list[Path]]) -> None:
    small = [np.asarray(Image.open(p).convert("L").resize((60, 60), Image.NEAREST)) for p in characters[5][:2]]
    assert torch.equal(verifier.pixels(np.stack(small)), verifier.pixels(small))
    assert torch.equal(verifier.pixels(np.stack(small).astype(np.int64)), verifier.pixels(small))
    assert verifier.embed(np.zeros((0, 60, 60), np.uint8)).shape == (0, verifier.model.embedding_dim)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((105, 105), np.float32), "not float32 values"),
        (np.full((105, 105), 256, np.int64), "not int64 values from 256 to 256"),
        (np.zeros((2, 105, 105), np.float64), "not float64 values"),
    ],
    ids=["ink-floats", "over-255", "float-batch"],
)
def test_an_array_that_is_not_gray_levels_is_a_data_error(verifier: Verifier, array: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=f"image arrays hold gray levels 0–255 .*{message}"):
        verifier.embed(array)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])  # gray with a channel axis, gray and alpha, RGB, RGBA
def test_a_channel_last_array_is_a_data_error_not_a_batch(
    verifier: Verifier, characters: list[list[Path]], channels: int
) -> None:
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    colour = np.asarray(Image.open(characters[0][0]).convert(mode)).reshape(105, 105, channels)
    message = rf"a \(105, 105, {channels}\) array is one image with {channels} channel\(s\)"  # 1, 2: a batch before
    for call in (
        lambda: verifier.embed(colour),  # read as 105 images 105 × 3 pixels wide before
        lambda: verifier.compare(colour, characters[0][1]),  # a bare ValueError from np.stack before
        lambda: verifier.classify([colour], characters[0][0].parent.parent, cache=False),
    ):
        with pytest.raises(DataError, match=message):
            call()
    assert verifier.pixels(colour[..., 0]).shape == (1, 105, 105)  # one channel of it is one image


def test_an_array_of_more_than_two_axes_in_a_list_is_a_data_error(verifier: Verifier) -> None:
    with pytest.raises(DataError, match=r"an image array is \[H, W\] of gray levels .*not 3-D"):
        verifier.embed([np.zeros((2, 105, 105), np.uint8)])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("not an image"), "not a readable image"),
    ],
    ids=["missing", "directory", "empty", "text"],
)
def test_bad_image_path_is_a_data_error(
    verifier: Verifier, characters: list[list[Path]], tmp_path: Path, make, message: str
) -> None:
    bad = tmp_path / "b.png"
    make(bad)
    with pytest.raises(DataError, match=message):
        verifier.compare(characters[0][0], bad)


def test_weights_that_do_not_fit_the_config_are_a_checkpoint_error(checkpoint: Path, tmp_path: Path) -> None:
    state = load_checkpoint(checkpoint)
    state["model"] = build_model("fast", width=16).state_dict()
    broken = save_checkpoint(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="weights do not fit its model config"):
        Verifier.from_checkpoint(broken, "cpu")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_a_checkpoint_error(checkpoint: Path, tmp_path: Path, value: float) -> None:
    state = load_checkpoint(checkpoint)
    name = next(name for name, tensor in state["model"].items() if tensor.is_floating_point())
    state["model"][name].view(-1)[0] = value
    broken = save_checkpoint(state, tmp_path / "broken.pt")
    # compare said "score nan", and export's check passed NaN models, before
    with pytest.raises(CheckpointError, match=re.escape(f"its weights are not finite (NaN or infinity in {name})")):
        Verifier.from_checkpoint(broken, "cpu")


def test_a_model_config_too_large_for_memory_is_a_checkpoint_error_at_once(checkpoint: Path, tmp_path: Path) -> None:
    state = load_checkpoint(checkpoint)
    state["model_config"]["width"] = 10**6
    broken = save_checkpoint(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"its model config cannot be built \(width=1000000, .* weights, more "):
        Verifier.from_checkpoint(broken, "cpu")  # a RuntimeError from torch's allocator before


def test_unknown_device_is_a_device_error(checkpoint: Path) -> None:
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        Verifier.from_checkpoint(checkpoint, "tpu")


def test_default_checkpoint_is_the_bundled_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = tmp_path / "weights" / "fast.pt"
    monkeypatch.setattr("siamese_omniglot.verify.BUNDLED_CHECKPOINT", bundled)
    with pytest.raises(CheckpointError, match=r"no checkpoint given, and this installation bundles no model .*"
                       r"pass a checkpoint trained with `siamese train`"):
        default_checkpoint()
    bundled.parent.mkdir()
    bundled.write_bytes(b"weights")
    assert default_checkpoint() == bundled


def test_the_bundled_model_is_the_trained_fast_preset() -> None:
    state = load_checkpoint(BUNDLED_CHECKPOINT)
    assert BUNDLED_CHECKPOINT.stat().st_size < 2_000_000
    assert state["model_config"] == build_model("fast").config.to_dict()
    assert state["train_config"]["preset"] == "fast" and "training" not in state  # weights, not a run to resume
    assert state["metrics"]["one_shot"] > 0.7 and state["metrics"]["roc_auc"] > 0.85 and 0 < state["threshold"] < 1


def test_compare_and_eval_work_with_the_bundled_model_alone(
    run_siamese, characters: list[list[Path]], mini_evaluation: Path, tmp_path: Path
) -> None:
    """Right after install: no checkpoint, no training, no network (``--data`` is a local tree)."""
    same = run_siamese("compare", characters[0][0], characters[0][1], "--json", cwd=tmp_path)
    different = run_siamese("compare", characters[0][0], characters[2][0], "--json", cwd=tmp_path)
    assert same.returncode == different.returncode == 0, same.stderr + different.stderr
    same, different = json.loads(same.stdout), json.loads(different.stdout)
    assert same["threshold"] == load_checkpoint(BUNDLED_CHECKPOINT)["threshold"]
    assert same["same"] and not different["same"] and same["score"] > different["score"]
    evaluation = run_siamese("eval", "--data", mini_evaluation, "--trials", 200, "--way", 5, "--json", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    assert json.loads(evaluation.stdout)["one_shot"]["accuracy"] > 0.6  # chance: 0.2
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing written


def test_pil_images_and_any_sequence_of_images_are_read_as_paths_are(
    verifier: Verifier, characters: list[list[Path]]
) -> None:
    paths = [characters[0][0], characters[0][1], characters[1][0]]
    expected = verifier.embed(paths)
    with Image.open(paths[0]) as opened:  # mode "1", as Omniglot's PNGs open: refused as "bool values" before
        assert torch.equal(verifier.pixels(opened), verifier.pixels(paths[0]))
        assert verifier.compare(opened, paths[1]) == verifier.compare(paths[0], paths[1])
    # a tuple was one image ("not 1-D"), a generator a raw error
    assert torch.equal(verifier.embed(tuple(paths)), expected)
    assert torch.equal(verifier.embed(path for path in paths), expected)


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((0, 105), np.uint8), r"a \(0, 105\) image array holds no pixels"),  # embedded as an image before
    (torch.full((105, 105), 255, dtype=torch.bfloat16), "image arrays hold gray levels 0–255"),  # a raw TypeError
], ids=["no-pixels", "bfloat16"])
def test_arrays_without_pixels_or_of_bfloat16_are_data_errors(verifier: Verifier, array, message: str) -> None:
    with pytest.raises(DataError, match=message):
        verifier.embed(array)


@pytest.mark.parametrize(("device", "message"), [
    (torch.device("cuda", 7), "'cuda:7'"),  # torch's own error, later, before
    (None, "unknown device 'None'"),  # an AttributeError before
])
def test_a_device_object_is_checked_as_its_name_is(checkpoint: Path, device, message: str) -> None:
    from siamese_omniglot.errors import DeviceError

    with pytest.raises(DeviceError, match=message):
        Verifier.from_checkpoint(checkpoint, device)
    assert Verifier.from_checkpoint(checkpoint, torch.device("cpu")).device == torch.device("cpu")
