"""Checkpoints: atomic saves and safe loads (``torch.load(weights_only=True)``: no code ever runs).

A checkpoint is a dict of tensors and plain values::

    format_version  int
    model_config    ModelConfig as a dict
    model           state dict of the SiameseNetwork
    threshold       calibrated decision threshold on the score (sigmoid of the logit)
    preprocessing   how images are turned into model input
    train_config    TrainConfig as a dict
    training        optimizer / scheduler / scaler / sampler states, epoch and step (for --resume)
    metrics         the last validation metrics
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .files import atomic_write

FORMAT_VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"  # how a file torch.save writes begins (a zip archive)
PICKLE_MAGIC = b"\x80"  # or, in its legacy format, a pickle
PREPROCESSING = {
    "canvas_px": 105,
    "ink": "1 - gray / 255 (strokes = 1, paper = 0)",
    "fit": "composite on white paper, pad to square on white, bilinear resize to the canvas, then frame "
    "(model_config.frame > 0: the ink's bounding box centred, its longer side scaled to that share of the input) or "
    "area-resize to the model's input",
}


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    Raises:
        OSError: the file cannot be written (a full disk, a read-only folder); ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, "preprocessing": PREPROCESSING} | state
    # serialised in memory first: torch's zip writer reports a failed write (a full disk) as a bare
    # RuntimeError about stream positions, while a plain file write raises OSError with the reason
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path) as file:
        file.write(buffer.getbuffer())
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; refuses pickled code, other formats and newer versions."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with path.open("rb") as file:
            head = file.read(len(ZIP_MAGIC))
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not head:
        raise CheckpointError(f"{path}: not a readable checkpoint (the file is empty)")
    if head != ZIP_MAGIC and head[:1] != PICKLE_MAGIC:  # an image, a text, another format
        raise CheckpointError(f"{path}: not a readable checkpoint (not a file written by torch.save)")
    if head == ZIP_MAGIC and not zipfile.is_zipfile(path):  # torch's own words: "[Errno 22]", or a miniz paragraph
        raise CheckpointError(f"{path}: not a readable checkpoint (cut short or damaged: its archive is incomplete; "
                              "copy it again)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # the weights-only unpickler names the class or function it met ("Unsupported global: …"): code, not data
        found = [line.strip() for line in str(error).splitlines() if "unsupported global" in line.lower()]
        if found:
            raise CheckpointError(
                f"{path}: refused: it holds objects other than tensors and plain values ({found[0]})"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(error)})") from None
    except Exception as error:  # truncated, empty, text, foreign formats: torch raises many types
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(error)})") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:  # before its keys:
        raise CheckpointError(  # a newer format may name them otherwise
            f"{path}: checkpoint format {version} is newer than this version reads ({FORMAT_VERSION}); "
            "upgrade siamese-omniglot"
        )
    required = {"format_version", "model", "model_config", "threshold"}
    if not isinstance(state, dict) or not required <= state.keys():
        raise CheckpointError(f"{path}: not a siamese-omniglot checkpoint (needs {', '.join(sorted(required))})")
    kinds = {"format_version": int, "model": dict, "model_config": dict, "threshold": (int, float)}
    wrong = [key for key, kind in kinds.items() if not isinstance(state[key], kind) or isinstance(state[key], bool)]
    if wrong:
        raise CheckpointError(f"{path}: not a siamese-omniglot checkpoint ({wrong[0]} has the wrong type)")
    if not 0 <= state["threshold"] <= 1:  # NaN too
        raise CheckpointError(f"{path}: its threshold {state['threshold']!r} is not a score between 0 and 1")
    return state


def _first_line(error: BaseException) -> str:
    """What went wrong, in one line: the first of the error's, or the unpickler's own reason after torch's notice
    about ``weights_only`` (whose advice, to load without it, would run whatever code the file holds)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        reasons = [line.split("error:", 1)[1].strip() for line in lines if "WeightsUnpickler error:" in line]
        return reasons[0] if reasons else "damaged"
    return lines[0] if lines else type(error).__name__
