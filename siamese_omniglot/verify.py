"""The Verifier: a trained model and its calibrated threshold, for comparing and embedding images."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import devices
from .checkpoint import load_checkpoint
from .data.images import fit_to_canvas, read_image
from .errors import CheckpointError
from .evaluate import embed_pixels
from .models import ModelConfig, SiameseNetwork

ImageLike = str | Path | np.ndarray | torch.Tensor


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

    def __init__(self, model: SiameseNetwork, threshold: float, device: torch.device) -> None:
        self.model = model.to(device=device, dtype=devices.inference_dtype(device)).eval()
        self.threshold = threshold
        self.device = device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> Verifier:
        """Load a checkpoint written by training (weights are loaded safely, no code runs)."""
        device = devices.resolve_device(device) if isinstance(device, str) else device
        state = load_checkpoint(path)
        model = SiameseNetwork(ModelConfig.from_dict(state["model_config"]))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            reason = str(error).splitlines()[0]
            raise CheckpointError(f"{path}: weights do not fit its model config ({reason})") from None
        return cls(model, float(state["threshold"]), device)

    def pixels(self, images: ImageLike | list[ImageLike]) -> torch.Tensor:
        """Decode paths (or take uint8 arrays [H, W] or batches [N, H, W]) into canvas images [N, H, W]."""
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
            return torch.as_tensor(images, dtype=torch.uint8)
        items = images if isinstance(images, list) else [images]
        arrays = [read_image(i) if isinstance(i, (str, Path)) else fit_to_canvas(np.asarray(i)) for i in items]
        return torch.from_numpy(np.stack(arrays).astype(np.uint8))

    def embed(self, images: ImageLike | list[ImageLike]) -> torch.Tensor:
        """Embeddings [N, D] of image files or uint8 arrays (255 = paper)."""
        return embed_pixels(self.model, self.pixels(images), self.device)

    @torch.no_grad()
    def score(self, first: ImageLike, second: ImageLike) -> float:
        """Same-class probability score in [0, 1] of two images."""
        embeddings = self.embed([first, second])
        return float(torch.sigmoid(self.model.score_embeddings(embeddings[:1], embeddings[1:])))

    def compare(self, first: ImageLike, second: ImageLike) -> Comparison:
        """Score two images and decide whether they show the same character."""
        score = self.score(first, second)
        return Comparison(score=score, same=score >= self.threshold, threshold=self.threshold)

