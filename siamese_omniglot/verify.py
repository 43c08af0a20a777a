"""The Verifier: a trained model and its calibrated threshold, for comparing, embedding and classifying images."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import devices
from .checkpoint import load_checkpoint
from .data.images import CANVAS_PX, fit_to_canvas, image_to_canvas, read_image, warn_of_dark_images
from .errors import CheckpointError, ConfigError, DataError, SiameseError
from .evaluate import embed_pixels
from .gallery import Classification, Support, class_scores, load_support, model_fingerprint, rank_classes
from .models import ModelConfig, SiameseNetwork, fold_batch_norm

ImageLike = str | Path | np.ndarray | torch.Tensor | Image.Image

# The bundled model: the fast preset's trained weights (docs/results.md says which run)
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "fast.pt"


def default_checkpoint() -> Path:
    """The checkpoint bundled with the package, used when a command is given none.

    Raises:
        CheckpointError: this installation bundles no model.
    """
    if BUNDLED_CHECKPOINT.is_file():
        return BUNDLED_CHECKPOINT
    raise CheckpointError(
        f"no checkpoint given, and this installation bundles no model ({BUNDLED_CHECKPOINT} is absent); "
        "pass a checkpoint trained with `siamese train`, such as logs/fast/best.pt"
    )


@dataclass(frozen=True)
class Comparison:
    """The verdict on one pair: ``score`` in [0, 1], ``same`` when ``score ≥ threshold``."""

    score: float
    same: bool
    threshold: float

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


class Verifier:
    """Scores image pairs with a trained SiameseNetwork and decides same/different by a stored threshold.

    >>> verifier = Verifier.from_checkpoint("logs/run/best.pt")     # doctest: +SKIP
    >>> verifier.compare("a.png", "b.png")                           # doctest: +SKIP
    Comparison(score=0.93, same=True, threshold=0.47)
    """

    def __init__(self, model: SiameseNetwork, threshold: float, device: str | torch.device) -> None:
        device = devices.resolve_device(str(device))  # a torch.device too: refused here if absent, not by torch later
        layout = devices.memory_format(device)
        self.model = model.to(device=device, dtype=devices.inference_dtype(device), memory_format=layout).eval()
        self.threshold = threshold
        self.device = device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> Verifier:
        """Load a checkpoint written by training (weights are loaded safely, no code runs), its batch norms
        folded into the convolutions for inference (see :func:`~siamese_omniglot.models.fold_batch_norm`).

        The model embeds with the views its threshold was calibrated for: a checkpoint saved during training
        (before the end of the run recalibrates it for the model's views) uses one view.
        """
        device = devices.resolve_device(str(device))
        state = load_checkpoint(path)
        try:
            config = ModelConfig.from_dict(state["model_config"])
            model = SiameseNetwork(replace(config, views=state.get("calibrated_views", config.views)))
        except (SiameseError, TypeError, ValueError, RuntimeError, MemoryError) as error:
            # another version's config, a hand-made one, or one too large for this machine's memory
            reason = str(error) or type(error).__name__
            raise CheckpointError(f"{path}: its model config cannot be built ({reason})") from None
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise CheckpointError(f"{path}: weights do not fit its model config ({_mismatch(error)})") from None
        broken = [name for name, tensor in model.state_dict().items()
                  if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
        if broken:
            raise CheckpointError(f"{path}: its weights are not finite (NaN or infinity in {broken[0]}); it scores "
                                  "nothing, so use another checkpoint (a run's best.pt never holds such weights)")
        return cls(fold_batch_norm(model), float(state["threshold"]), device)

    def pixels(self, images: ImageLike | list[ImageLike]) -> torch.Tensor:
        """Decode paths (or take gray-level arrays [H, W] or batches [N, H, W], 255 = paper) into canvas images
        [N, H, W], each padded to square and resized to the canvas as image files are.

        Raises:
            DataError: an array that is not of gray levels: floats, integers outside 0–255, or colour pixels.
        """
        items = _single_images(images)
        arrays = [read_image(i) if isinstance(i, (str, Path)) else image_to_canvas(i) if isinstance(i, Image.Image)
                  else fit_to_canvas(_gray_levels(i)) for i in items]
        if not arrays:
            return torch.empty(0, CANVAS_PX, CANVAS_PX, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays))

    def embed(self, images: ImageLike | list[ImageLike]) -> torch.Tensor:
        """Embeddings [N, D] of image files or uint8 arrays (255 = paper); images more than half dark are warned of
        (see :func:`~siamese_omniglot.data.images.warn_of_dark_images`)."""
        items = _single_images(images)
        pixels = self.pixels(items)
        warn_of_dark_images(pixels, _names(items))
        return self._embed_canvases(pixels)

    def _embed_canvases(self, pixels: torch.Tensor) -> torch.Tensor:
        return embed_pixels(self.model, pixels, self.device)

    @torch.no_grad()
    def score(self, first: ImageLike, second: ImageLike) -> float:
        """Same-class probability score in [0, 1] of two images."""
        embeddings = self.embed([first, second])
        return float(torch.sigmoid(self.model.score_embeddings(embeddings[:1], embeddings[1:])))

    def compare(self, first: ImageLike, second: ImageLike) -> Comparison:
        """Score two images and decide whether they show the same character."""
        score = self.score(first, second)
        return Comparison(score=score, same=score >= self.threshold, threshold=self.threshold)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the model's config (views included) and weights: the key of cached support embeddings.

        Computed at each use (milliseconds), so that it follows weights changed in place."""
        return model_fingerprint(self.model)

    def load_support(self, folder: str | Path, cache: bool = True, skip_bad_images: bool = False) -> Support:
        """Embed a support folder (``<class>/<image>`` or ``<class>.png``), or read it from its cache;
        ``skip_bad_images`` leaves out unreadable images with a warning instead of refusing the folder."""
        return load_support(folder, self._embed_canvases, self.fingerprint, cache, dim=self.model.embedding_dim,
                            skip_bad_images=skip_bad_images)

    def classify(
        self, queries: ImageLike | list[ImageLike], support: str | Path | Support, top_k: int = 5, cache: bool = True
    ) -> list[Classification]:
        """Recognise each query among the classes of a support gallery: the ``top_k`` classes, best first.

        A class scores the sigmoid of the mean logit over its support images; ``same`` marks scores at or
        above the threshold. The support embeddings are computed once and cached beside the images.

        >>> verifier.classify("query.png", "support/", top_k=3)[0].best      # doctest: +SKIP
        Match(class_name='character05', score=0.91, same=True)

        Args:
            queries: image files or uint8 arrays (255 = paper); one or a list.
            support: a support folder, or a :class:`Support` already loaded by :meth:`load_support`.
            top_k: how many classes to return per query.
            cache: read and write the support folder's embedding cache.
        """
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, not {top_k}")
        if not isinstance(support, Support):
            support = self.load_support(support, cache)
        elif support.model_key != self.fingerprint:  # its embeddings would be compared with another model's
            raise ConfigError(f"{support.folder}: the support was embedded by another model; load it with this "
                              "verifier's load_support")
        items = _single_images(queries)
        scores = class_scores(self.model, self.embed(items), support)
        return rank_classes(scores, support, _names(items), top_k, self.threshold)


def _mismatch(error: RuntimeError, limit: int = 160) -> str:
    """The first particular of ``load_state_dict``'s error (its first line only names the module), shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def _single_images(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """One image, a list, tuple or iterator of them, or a batch [N, H, W], as a list of single images; colour
    arrays are refused."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
        _refuse_colour(images)
        return list(images)
    if isinstance(images, (str, Path, np.ndarray, torch.Tensor, Image.Image)):
        return [images]
    return list(images) if isinstance(images, Iterable) else [images]


def _names(items: list[ImageLike]) -> list[str]:
    """What messages and results call each image: its path, else ``image <position>``."""
    return [str(item) if isinstance(item, (str, Path)) else f"image {i}" for i, item in enumerate(items)]


def _refuse_colour(array: np.ndarray | torch.Tensor) -> None:
    """Refuse an image with its channels last, [H, W, 1 to 4] (gray, gray and alpha, colour), which would be misread
    as a batch of H images 1 to 4 pixels wide."""
    if array.shape[-1] <= 4 and min(array.shape[:2]) > 4:
        raise DataError(f"a {tuple(array.shape)} array is one image with {array.shape[-1]} channel(s), not gray "
                        "levels [H, W] or a batch [N, H, W]: pass the file path, or convert it first "
                        "(PIL: Image.convert('L'))")


def _gray_levels(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An array of gray levels [H, W] as uint8, refusing what would be silently misread (floats of ink in [0, 1],
    colour pixels)."""
    if isinstance(image, torch.Tensor):
        array = (image.float() if image.dtype == torch.bfloat16 else image).numpy(force=True)  # numpy has no bf16
    else:
        array = np.asarray(image)
    if array.ndim == 3:
        _refuse_colour(array)
    if array.ndim != 2:
        raise DataError(f"an image array is [H, W] of gray levels (or a batch [N, H, W]), not {array.ndim}-D")
    if array.size == 0:
        raise DataError(f"a {tuple(array.shape)} image array holds no pixels")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iu" or not 0 <= array.min() <= array.max() <= 255:
        raise DataError(f"image arrays hold gray levels 0–255 (uint8, 255 = paper), not {array.dtype} values"
                        + ("" if array.dtype.kind not in "iu" else f" from {array.min()} to {array.max()}"))
    return array.astype(np.uint8)
