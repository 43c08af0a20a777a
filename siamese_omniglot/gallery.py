"""One-shot recognition against a support gallery: a folder of labelled images, embedded once and cached.

A support folder holds one folder of images per class, ``DIR/<class>/<image>``, or one image per class,
``DIR/<class>.png``; both may be mixed. A query goes to the classes whose support images score highest
(the mean logit over a class's images, as in the N-way K-shot protocol of :mod:`.evaluate`).

The support embeddings are cached in ``DIR/.siamese-cache/``, keyed by the model (its config, views
included, and weights) and by the names and bytes of the support images: adding, removing or changing an
image, or using another model, computes them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.folders import visible_images
from .data.images import decode_image, some_of, warn_of_dark_images
from .errors import DataError
from .files import atomic_write
from .models import SiameseNetwork

log = logging.getLogger(__name__)

CACHE_DIR = ".siamese-cache"
CACHE_VERSION = 2  # raised when decoding changes, so no cache of the old decoding is served
_SCORE_CHUNK = 1 << 24  # elements of |q − s| per scoring chunk: bounded memory for big galleries

EmbedFn = Callable[[torch.Tensor], torch.Tensor]  # uint8 canvases [N, H, W] → embeddings [N, D]


@dataclass(frozen=True)
class Support:
    """A support gallery: its classes and one embedding per image."""

    folder: Path
    class_names: tuple[str, ...]
    paths: tuple[str, ...]  # relative POSIX paths of the images, sorted by class then name
    labels: torch.Tensor  # int64 [M]: class index of each image
    embeddings: torch.Tensor  # float32 [M, D], on the CPU
    cache_path: Path | None  # where the embeddings are cached (None: not cached)
    from_cache: bool  # whether they were read from the cache rather than computed
    model_key: str = ""  # the model that embedded them (see :func:`model_fingerprint`)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Match:
    """One candidate class for a query: ``score`` in [0, 1], ``same`` when ``score ≥ threshold``."""

    class_name: str
    score: float
    same: bool


@dataclass(frozen=True)
class Classification:
    """The classes that best match one query, best first."""

    query: str
    matches: tuple[Match, ...]

    @property
    def best(self) -> Match:
        """The top match."""
        return self.matches[0]

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return {"query": self.query, "matches": [{"class": m.class_name, "score": m.score, "same": m.same}
                                                 for m in self.matches]}


def scan_support(folder: str | Path) -> list[tuple[str, str]]:
    """The ``(class name, relative path)`` of every image in a support folder, sorted.

    ``<class>/<image>`` files belong to ``<class>``; ``<name>.<ext>`` files at the top are classes of one
    image named by their stem. Hidden files and folders and files that are not images are skipped.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise DataError(f"{folder}: {what} (expected a support folder of <class>/<image> or <class>.png)")
    found: list[tuple[str, str]] = []
    for relative in visible_images(folder):
        if len(relative.parts) > 2:
            raise DataError(
                f"{folder}: {relative} is too deep; a support folder holds <class>/<image> or <class>.png "
                f"(point --support at a folder of classes, such as one alphabet)"
            )
        name = relative.parts[0] if len(relative.parts) == 2 else relative.stem
        found.append((name, str(relative)))
    if not found:
        raise DataError(f"{folder}: no images found (expected <class>/<image> or <class>.png)")
    return sorted(found)


def model_fingerprint(model: SiameseNetwork) -> str:
    """SHA-256 of a model's config (views included) and its weights and buffers (names, dtypes, shapes, values)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{value.dtype}\0{tuple(value.shape)}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_support(
    folder: str | Path,
    embed: EmbedFn,
    model_key: str,
    cache: bool = True,
    dim: int | None = None,
    skip_bad_images: bool = False,
) -> Support:
    """Read a support folder and embed its images, or take the embeddings from the cache.

    Args:
        folder: the support folder (see :func:`scan_support`).
        embed: turns uint8 canvases [N, H, W] into embeddings [N, D].
        model_key: identifies the model (see :func:`model_fingerprint`); part of the cache key.
        cache: read and write ``folder/.siamese-cache/``.
        dim: the length of the model's embeddings; a cache holding others is ignored (any length when None).
        skip_bad_images: leave out unreadable images (listed in a warning, and the gallery not cached, so a later
            load without skipping still sees them) instead of refusing the folder.
    """
    folder = Path(folder).expanduser()
    entries = scan_support(folder)
    contents = {}
    problems: list[str] = []  # the images left out, with skip_bad_images
    digest = hashlib.sha256(f"{CACHE_VERSION}\0{model_key}\n".encode())
    for name, relative in entries:
        try:
            data = (folder / relative).read_bytes()
        except OSError as error:
            problem = f"{folder / relative}: cannot read ({error.strerror})"
            if not skip_bad_images:
                raise DataError(problem) from None
            problems.append(problem)
            continue
        contents[relative] = data
        digest.update(f"{name}\0{relative}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    class_names, paths, labels = _classes_of(entries)
    prefix = f"support-v{CACHE_VERSION}-{model_key[:12]}-"
    cache_path = folder / CACHE_DIR / f"{prefix}{digest.hexdigest()[:20]}.npz" if cache and not problems else None

    if cache_path is not None and cache_path.is_file():
        embeddings = _read_cache(cache_path, paths, dim)
        if embeddings is not None:
            return Support(folder, class_names, paths, labels, embeddings, cache_path, True, model_key)
    canvases: dict[str, np.ndarray] = {}
    for relative in filter(contents.__contains__, paths):
        try:
            canvases[relative] = decode_image(contents[relative], str(folder / relative))
        except DataError as error:
            if not skip_bad_images:
                raise
            problems.append(str(error))
    if problems:
        if not canvases:
            raise DataError(f"{folder}: none of its {len(paths)} images can be read: {some_of(problems, 3, '; ')}")
        log.warning("%s: skipping %d unreadable images: %s", folder, len(problems), some_of(problems, separator="; "))
        class_names, paths, labels = _classes_of([entry for entry in entries if entry[1] in canvases])
        cache_path = None  # a later load without skipping still sees them
    pixels = torch.from_numpy(np.stack([canvases[p] for p in paths]))
    warn_of_dark_images(pixels, [str(folder / p) for p in paths])
    embeddings = embed(pixels).float().cpu()
    if cache_path is not None:
        try:
            _write_cache(cache_path, paths, embeddings)
            for stale in cache_path.parent.glob(f"{prefix}*.npz"):  # this model's caches of earlier contents
                if stale != cache_path:
                    stale.unlink(missing_ok=True)
        except OSError as error:
            log.warning("cannot write %s (%s); the support images will be embedded again next time",
                        cache_path, error.strerror)
            cache_path = None
    return Support(folder, class_names, paths, labels, embeddings, cache_path, False, model_key)


def _classes_of(entries: list[tuple[str, str]]) -> tuple[tuple[str, ...], tuple[str, ...], torch.Tensor]:
    """The sorted class names, the image paths and their class indices of ``(class name, path)`` entries."""
    class_names = tuple(sorted({name for name, _ in entries}))
    index = {name: i for i, name in enumerate(class_names)}
    labels = torch.tensor([index[name] for name, _ in entries], dtype=torch.int64)
    return class_names, tuple(relative for _, relative in entries), labels


def _write_cache(path: Path, paths: tuple[str, ...], embeddings: torch.Tensor) -> None:
    """Write atomically (see :func:`siamese_omniglot.files.atomic_write`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as file:
        np.savez(file, paths=np.array(paths), embeddings=embeddings.numpy())


def _read_cache(path: Path, paths: tuple[str, ...], dim: int | None) -> torch.Tensor | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            if tuple(str(p) for p in stored["paths"]) != paths:
                raise ValueError("other images")
            embeddings = np.asarray(stored["embeddings"], dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(paths) or dim not in (None, embeddings.shape[1]):
            raise ValueError("wrong shape")
        if not np.isfinite(embeddings).all():
            raise ValueError("not numbers")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        log.warning("ignoring unreadable cache %s", path)
        return None
    return torch.from_numpy(embeddings)


@torch.no_grad()
def class_scores(model: SiameseNetwork, queries: torch.Tensor, support: Support) -> torch.Tensor:
    """Scores [Q, C] in [0, 1]: the sigmoid of each class's mean logit over its support images."""
    device = queries.device
    embeddings = support.embeddings.to(device, queries.dtype)
    labels = support.labels.to(device)
    counts = torch.bincount(labels, minlength=support.num_classes).to(queries.dtype)
    per_chunk = max(1, _SCORE_CHUNK // max(1, embeddings.numel()))
    parts = []
    for chunk in queries.split(per_chunk):
        logits = model.score_embeddings(chunk[:, None, :], embeddings[None, :, :]).float()  # [q, M]
        sums = torch.zeros(len(chunk), support.num_classes, device=device).index_add_(1, labels, logits)
        parts.append(torch.sigmoid(sums / counts))
    return torch.cat(parts).cpu()


def rank_classes(
    scores: torch.Tensor, support: Support, queries: list[str], top_k: int, threshold: float
) -> list[Classification]:
    """The ``top_k`` classes of each query by score, best first (ties: the class listed first)."""
    k = min(top_k, support.num_classes)
    top = torch.sort(scores, dim=1, descending=True, stable=True)
    results = []
    for query, values, indices in zip(queries, top.values[:, :k].tolist(), top.indices[:, :k].tolist(), strict=True):
        matches = tuple(Match(support.class_names[i], v, v >= threshold) for v, i in zip(values, indices, strict=True))
        results.append(Classification(query, matches))
    return results
