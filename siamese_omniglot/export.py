"""ONNX export: the embedding network and the pair scorer as two ONNX models, checked against PyTorch.

Two files, so that a gallery is embedded once and each new image costs one embedding:

- ``embedding.onnx``: ``pixels`` uint8 [batch, 105, 105] (the canvas of ``Verifier.pixels``, 255 = paper)
  → ``embeddings`` float32 [batch, D]. The ink conversion, the model's framing or resize and its views are inside
  the graph.
- ``scorer.onnx``: ``first``, ``second`` float32 [batch, D] → ``logits`` and ``scores`` (the sigmoid of the
  logits) float32 [batch]; two images show the same character when ``scores ≥ threshold``.

Both carry the threshold, the model settings and the preprocessing in their metadata (``siamese.*`` keys).
Exporting needs the ``onnx`` extra (``pip install 'siamese-omniglot[onnx]'``): ``onnx`` and ``onnxruntime``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import numbers
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .checkpoint import PREPROCESSING
from .data.images import CANVAS_PX, to_ink
from .errors import ConfigError, DependencyError, ExportError, OutputError
from .files import atomic_write, make_folders, remove_empty
from .models import SiameseNetwork
from .verify import Verifier

DEFAULT_OPSET = 17
FRAMING_OPSET = 16  # the first opset whose ScatterElements can add
TOLERANCE = 1e-4  # largest absolute difference from PyTorch accepted in float32
EMBEDDING_FILE = "embedding.onnx"
SCORER_FILE = "scorer.onnx"
CHECK_BATCHES = (1, 8)  # two batch sizes: the dynamic batch axis is exercised, not just declared


@dataclass(frozen=True)
class OnnxExport:
    """Where an export wrote its models and how closely onnxruntime reproduces PyTorch."""

    embedding_path: Path
    scorer_path: Path
    embedding_dim: int
    threshold: float
    opset: int
    embedding_max_abs_diff: float  # over the embeddings of every check batch
    scorer_max_abs_diff: float  # over the logits and scores of every check batch
    tolerance: float
    check_batches: tuple[int, ...]

    @property
    def max_abs_diff(self) -> float:
        """The larger of the two differences."""
        return max(self.embedding_max_abs_diff, self.scorer_max_abs_diff)

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self) | {
            "embedding_path": str(self.embedding_path),
            "scorer_path": str(self.scorer_path),
            "check_batches": list(self.check_batches),
            "max_abs_diff": self.max_abs_diff,
        }


class PixelEmbedding(nn.Module):
    """uint8 canvas pixels [N, H, W] → embeddings [N, D]: ink, then the model's ``Embedding`` (its framing or area
    resize, both matrix products, and its views)."""

    def __init__(self, model: SiameseNetwork) -> None:
        super().__init__()
        self.embedding = model.embedding

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embedding(to_ink(pixels))


class PairScorer(nn.Module):
    """Embeddings [N, D] × 2 → same-class logits [N] and scores (their sigmoid) [N]."""

    def __init__(self, model: SiameseNetwork) -> None:
        super().__init__()
        self.head = model.head

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head((first - second).abs()).squeeze(-1)
        return logits, torch.sigmoid(logits)


def check_pixels(count: int, seed: int = 0) -> torch.Tensor:
    """``count`` synthetic canvases for the check: pen strokes of random widths on white paper."""
    rng = np.random.default_rng(seed)
    canvases = []
    for _ in range(count):
        image = Image.new("L", (CANVAS_PX, CANVAS_PX), 255)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 7))):
            points = [tuple(int(v) for v in rng.integers(5, CANVAS_PX - 5, 2)) for _ in range(3)]
            draw.line(points, fill=int(rng.integers(0, 80)), width=int(rng.integers(1, 5)))
        canvases.append(np.asarray(image))
    return torch.from_numpy(np.stack(canvases))


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise DependencyError(
            f"ONNX export needs onnx and onnxruntime ({error.name or 'onnx'} is missing): "
            "pip install 'siamese-omniglot[onnx]'"
        ) from None
    return onnx, onnxruntime


def export_onnx(
    model: SiameseNetwork | Verifier,
    out_dir: str | Path,
    threshold: float | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = TOLERANCE,
) -> OnnxExport:
    """Write ``embedding.onnx`` and ``scorer.onnx`` to ``out_dir`` and check them with onnxruntime.

    The models are exported in float32 on the CPU with a dynamic batch axis, then run by onnxruntime at
    two batch sizes on synthetic strokes and compared with PyTorch. The files appear only when the largest
    absolute difference is within ``tolerance``; otherwise nothing is written and ``ExportError`` says by
    how much they differ. Existing files of the same names are replaced.

    Args:
        model: a ``Verifier`` (its threshold is used) or a ``SiameseNetwork``.
        out_dir: the folder to write to (created when missing).
        threshold: the decision threshold stored in the metadata (default: the Verifier's; required with a
            ``SiameseNetwork``).
        opset: the ONNX opset version.
        tolerance: the largest absolute difference from PyTorch accepted.
    """
    if isinstance(model, Verifier):
        threshold = model.threshold if threshold is None else threshold
        model = model.model
    if threshold is None:
        raise ConfigError("a SiameseNetwork carries no calibrated threshold: pass threshold= or a Verifier")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not 0 <= threshold <= 1:  # NaN too
        raise ConfigError(f"threshold {threshold!r} is not a score between 0 and 1")
    threshold = float(threshold)
    onnx, ort = _onnx_modules()
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:  # torch's exporter garbles a number past a C int's range
        raise ExportError(f"ONNX opset {opset} is newer than the installed onnx {onnx.__version__} knows (opset "
                          f"{newest} at most)")
    if model.config.frame and opset < FRAMING_OPSET:
        # framing sums sampling weights with a scatter-add, which ONNX has only from opset 16 (ScatterElements)
        raise ExportError(f"a model that frames its input needs ONNX opset {FRAMING_OPSET} or later, not {opset}")
    network = _cpu_copy(model)
    embedding, scorer = PixelEmbedding(network).eval(), PairScorer(network).eval()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # "cannot create (File exists)" otherwise
        raise OutputError(f"{out_dir}: is a file; --out must name a folder")
    embedding_path, scorer_path = out_dir / EMBEDDING_FILE, out_dir / SCORER_FILE
    for path in (embedding_path, scorer_path):
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; remove it or choose another --out")
    dim = network.embedding_dim
    metadata = {
        "siamese.threshold": json.dumps(threshold),
        "siamese.model_config": json.dumps(network.config.to_dict()),
        "siamese.preprocessing": json.dumps(PREPROCESSING),
        "siamese.embedding_dim": str(dim),
    }
    # both files appear together when the check passes, and neither when anything fails
    try:
        with (
            _output_folder(out_dir),
            atomic_write(embedding_path) as embedding_file,
            atomic_write(scorer_path) as scorer_file,
        ):
            embedding_tmp, scorer_tmp = Path(embedding_file.name), Path(scorer_file.name)
            _export(embedding, (check_pixels(2),), embedding_tmp, ["pixels"], ["embeddings"], opset)
            vectors = torch.zeros(2, dim)
            _export(scorer, (vectors, vectors), scorer_tmp, ["first", "second"], ["logits", "scores"], opset)
            for path, role in ((embedding_tmp, "embedding"), (scorer_tmp, "scorer")):
                _add_metadata(onnx, path, metadata | {"siamese.role": role})
            embedding_diff, scorer_diff = _compare(ort, network, embedding_tmp, scorer_tmp)
            if max(embedding_diff, scorer_diff) > tolerance:
                raise ExportError(
                    f"onnxruntime differs from PyTorch by {max(embedding_diff, scorer_diff):.3g} (embeddings "
                    f"{embedding_diff:.3g}, scores {scorer_diff:.3g}), more than {tolerance:g}; nothing was "
                    f"written. Try another --opset, or report the torch and onnxruntime versions"
                )
    except OSError as error:  # a full disk or a read-only folder: the temporary files are gone
        raise OutputError(f"{out_dir}: cannot write the models there ({error.strerror or error})") from None
    return OnnxExport(
        embedding_path=embedding_path,
        scorer_path=scorer_path,
        embedding_dim=dim,
        threshold=threshold,
        opset=opset,
        embedding_max_abs_diff=embedding_diff,
        scorer_max_abs_diff=scorer_diff,
        tolerance=tolerance,
        check_batches=CHECK_BATCHES,
    )


@contextlib.contextmanager
def _output_folder(out_dir: Path) -> Iterator[None]:
    """Make ``out_dir`` (parents included) for a block; when the block fails, remove again the folders made here
    that it left empty."""
    try:
        made = make_folders(out_dir)
    except OSError as error:
        raise OutputError(f"{out_dir}: cannot create ({error.strerror})") from None
    try:
        yield
    except BaseException:
        remove_empty(made)
        raise


@contextlib.contextmanager
def _no_standard_output() -> Iterator[None]:
    """Discard what a block writes to file descriptor 1: the exporter's C++ side prints the whole graph there when
    it fails, which would corrupt ``--json`` output. Where descriptor 1 is not open, the block runs as it is."""
    _flush(sys.stdout)
    try:
        saved = os.dup(1)
    except OSError:  # standard output closed
        saved = None
    if saved is None:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        try:
            _flush(sys.stdout)
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _flush(stream: TextIO | None) -> None:
    """Flush a stream that may be None or closed."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        stream.flush()


def _cpu_copy(model: SiameseNetwork) -> SiameseNetwork:
    """A float32 CPU copy in eval mode (the caller's model stays where it is)."""
    return copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], opset: int) -> None:
    options: dict = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        # the TorchScript exporter: it needs no onnxscript, and torch 2.4 (no such argument) uses it anyway
        options["dynamo"] = False
    dynamic = {name: {0: "batch"} for name in [*inputs, *outputs]}
    with warnings.catch_warnings(), torch.no_grad(), _no_standard_output():
        warnings.simplefilter("ignore")  # deprecation notices about the exporter itself
        try:
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, **options)
        except Exception as error:  # the exporter raises many types, all meaning "cannot export this"
            first = next(iter(str(error).splitlines()), type(error).__name__)
            raise ExportError(f"cannot export to ONNX opset {opset}: {first}") from None


def _add_metadata(onnx, path: Path, values: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


@torch.no_grad()
def _compare(ort, network: SiameseNetwork, embedding_path: Path, scorer_path: Path) -> tuple[float, float]:
    """Largest absolute differences between onnxruntime and the PyTorch model as the Verifier runs it
    (``embed(to_ink(pixels))``; logits and their sigmoid)."""
    embed_session = _session(ort, embedding_path)
    score_session = _session(ort, scorer_path)
    embedding_diff = scorer_diff = 0.0
    for seed, batch in enumerate(CHECK_BATCHES):
        pixels = check_pixels(batch, seed + 1)
        expected = network.embed(to_ink(pixels))
        (got,) = embed_session.run(None, {"pixels": pixels.numpy()})
        embedding_diff = max(embedding_diff, _difference(got, expected.numpy()))
        other = expected.roll(1, dims=0)  # pairs (i, i - 1); with a batch of 1, an image with itself
        logits = network.score_embeddings(expected, other)
        outputs = score_session.run(None, {"first": expected.numpy(), "second": other.numpy()})
        for output, reference in zip(outputs, (logits, torch.sigmoid(logits)), strict=True):
            scorer_diff = max(scorer_diff, _difference(output, reference.numpy()))
    return embedding_diff, scorer_diff


def _difference(got: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference; infinite where a value is NaN on either side (``max`` would pass a NaN over)."""
    difference = np.abs(got - expected)
    return math.inf if bool(np.isnan(difference).any()) else float(difference.max())


def _session(ort, path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types
        raise ExportError(f"onnxruntime cannot load the exported model: {error}") from None
