"""Checkpoints: round trip, atomic saves that never damage an existing file, and loads that run no code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from siamese_omniglot.checkpoint import FORMAT_VERSION, PREPROCESSING, load_checkpoint, save_checkpoint
from siamese_omniglot.errors import CheckpointError
from siamese_omniglot.models import ModelConfig, SiameseNetwork, build_model


def model_state() -> dict:
    torch.manual_seed(0)
    model = build_model("fast", width=8, blocks=2)
    return {"model_config": model.config.to_dict(), "model": model.state_dict(), "threshold": 0.42}


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_round_trip(tmp_path: Path) -> None:
    state = model_state()
    path = save_checkpoint(state, tmp_path / "runs" / "best.pt")
    loaded = load_checkpoint(path)
    assert path == tmp_path / "runs" / "best.pt"
    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["preprocessing"] == PREPROCESSING
    assert loaded["threshold"] == 0.42
    assert loaded["model"].keys() == state["model"].keys()
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    rebuilt = SiameseNetwork(ModelConfig.from_dict(loaded["model_config"]))
    rebuilt.load_state_dict(loaded["model"])  # strict: every weight fits the stored config
    assert (path.stat().st_mode & 0o777) == 0o644


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    for _ in range(2):
        save_checkpoint(model_state(), tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def write_half_then_fail(obj, file) -> None:
    file.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize(
    ("patch_save", "extra", "error"),
    [
        (False, {"callback": lambda: None}, (pickle.PicklingError, AttributeError, TypeError)),
        (True, {}, OSError),
    ],
    ids=["unpicklable", "disk-full-mid-write"],
)
def test_failed_save_keeps_the_existing_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patch_save: bool, extra: dict, error
) -> None:
    path = save_checkpoint(model_state(), tmp_path / "last.pt")
    before = path.read_bytes()
    if patch_save:
        monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(error):
        save_checkpoint(model_state() | {"threshold": 0.9} | extra, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["threshold"] == 0.42
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save(model_state() | {"format_version": FORMAT_VERSION, "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused: it holds objects other than tensors"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe loader would have run it
    assert marker.is_dir()


@pytest.mark.parametrize("renamed", [False, True], ids=["same-keys", "renamed-keys"])
def test_newer_format_is_refused(tmp_path: Path, renamed: bool) -> None:
    state = model_state() | {"format_version": FORMAT_VERSION + 1}
    if renamed:  # a later format may name or type its keys otherwise: still "upgrade", not "no checkpoint"
        state["thresholds"] = {"pair": state.pop("threshold")}
    path = save_checkpoint(state, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1} is newer.*upgrade siamese-omniglot"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such checkpoint"),
        (lambda p: p.mkdir(), "is a directory, not a checkpoint file"),
        (lambda p: torch.save([torch.zeros(3)], p), "not a siamese-omniglot checkpoint"),
        (lambda p: torch.save({"model": {}}, p), "not a siamese-omniglot checkpoint"),
    ],
    ids=["missing", "directory", "list", "no-version"],
)
def test_unusable_paths_are_checkpoint_errors(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "best.pt"
    make(path)
    with pytest.raises(CheckpointError, match=message) as raised:
        load_checkpoint(path)
    assert str(raised.value).startswith(f"{path}: ")


@pytest.mark.parametrize("threshold", [float("nan"), 5.0, -0.1])
def test_a_threshold_that_is_no_score_is_refused(tmp_path: Path, threshold: float) -> None:
    path = save_checkpoint(model_state() | {"threshold": threshold}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt: its threshold .* is not a score between 0 and 1"):
        load_checkpoint(path)


def test_an_image_given_as_a_checkpoint_is_named_as_no_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "drawing.png"
    Image.new("L", (105, 105), 255).save(path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    assert str(raised.value) == f"{path}: not a readable checkpoint (not a file written by torch.save)"


def test_a_checkpoint_in_the_legacy_torch_format_loads(tmp_path: Path) -> None:
    state = {"format_version": FORMAT_VERSION, "preprocessing": PREPROCESSING} | model_state()
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert load_checkpoint(tmp_path / "legacy.pt")["threshold"] == state["threshold"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: b"this is not a checkpoint at all\n" * 10,
        lambda data: bytes(range(256)) * 16,
        lambda data: data[: len(data) // 2],
    ],
    ids=["empty", "text", "binary", "truncated"],
)
def test_garbage_files_are_checkpoint_errors(tmp_path: Path, damage) -> None:
    path = save_checkpoint(model_state(), tmp_path / "best.pt")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    assert str(raised.value).startswith(f"{path}: ")


@pytest.mark.parametrize("kept", [1000, 20000, -1], ids=["head", "most", "all-but-one-byte"])
def test_a_checkpoint_cut_short_says_so(tmp_path: Path, kept: int) -> None:
    path = save_checkpoint(model_state(), tmp_path / "best.pt")
    path.write_bytes(path.read_bytes()[:kept])
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    # torch's words before: "[Errno 22] Invalid argument", or a paragraph about miniz's central directory
    assert str(raised.value) == (f"{path}: not a readable checkpoint (cut short or damaged: its archive is incomplete; "
                                 "copy it again)")
