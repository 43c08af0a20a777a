"""Siamese networks: a shared embedding network and a similarity head on |e1 − e2| giving one logit.

Every model takes ink images (float [N, 1, H, W] in [0, 1], 1 = stroke; see ``data.to_ink``) of any
size and resizes them to its own input size, so callers never need to know a model's resolution. A model
may first *frame* each character (``ModelConfig.frame``): centre its ink and scale it to a fixed share of the
input (:mod:`siamese_omniglot.data.framing`).

Backbones:

- ``vgg16``: the reference's network (bubbliiiing/Siamese-pytorch): torchvision's VGG16 conv stack on
  3-channel 105 × 105 input, 4,608 features, head Linear(4608, 512) → Linear(512, 1).
- ``koch``: Koch, Zemel & Salakhutdinov (2015), "Siamese Neural Networks for One-shot Image
  Recognition": four conv layers, a 4,096-unit sigmoid embedding, a weighted L1 head.
- ``fast``: a few 3 × 3 conv + batch-norm blocks at a reduced resolution (the 4-block design of
  few-shot learning papers), trained in minutes on two CPU cores.

Outside training, a model may embed each image as the average of several *views*, the image shifted by one
pixel at the backbone's input size (test-time augmentation, ``ModelConfig.views``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, fields
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .data.framing import frame_ink, resize_to
from .errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

MOST_INPUT_PX = 1024  # far above the 105-px canvas every image is decoded to
MOST_WEIGHTS = 1_000_000_000  # 4 GB of float32; the seed preset's VGG16 has 138 million


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint.

    The defaults are those of the first checkpoints, which stored fewer settings: :meth:`from_dict` fills in what
    an older checkpoint leaves out. The named networks are :data:`BACKBONES` (``build_model(name)``).
    """

    backbone: str = "fast"
    input_px: int = 40
    width: int = 64  # channels of the fast backbone's first block (BACKBONES["fast"]: 32)
    blocks: int = 4  # conv blocks of the fast backbone
    normalize: bool = False  # L2-normalise embeddings (the classify objective)
    batch_norm: bool = True  # fast backbone: batch norm after each conv (off: exact multi-process equivalence)
    final_pool: bool = True  # fast backbone: max-pool after the last block too (off: keep its finer feature map)
    views: int = 1  # outside training, average embeddings over this many shifted views (see VIEW_SHIFTS)
    widen: int = 1  # fast backbone: each block has this many times the channels of the block before (1: as before it)
    frame: float = 0.0  # centre each character, its ink box's longer side scaled to this share of the input (0: off)

    def to_dict(self) -> dict:
        """Plain dict for checkpoints and JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a checkpoint error, missing ones keep their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise CheckpointError(f"unknown model settings {sorted(unknown)}: checkpoint from a newer version?")
        return cls(**values)

    def __post_init__(self) -> None:
        if not isinstance(self.input_px, int) or not 1 <= self.input_px <= MOST_INPUT_PX:
            raise ConfigError(f"input_px={self.input_px!r}: the input size must be from 1 to {MOST_INPUT_PX} px")
        if not 0 <= self.frame <= 1:  # NaN too
            raise ConfigError(f"frame={self.frame!r}: the share of the input a character fills, from 0 (off) to 1")


# Views by count: (dx, dy) shifts in pixels at the backbone's input size, the unshifted image first.
VIEW_SHIFTS: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((0, 0),),
    5: ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)),
    9: ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)),
}


def check_views(views: int) -> int:
    """``views`` when it is a supported view count (see ``VIEW_SHIFTS``); else a ConfigError."""
    if views not in VIEW_SHIFTS:
        raise ConfigError(f"views={views!r}: choose one of {', '.join(map(str, VIEW_SHIFTS))}")
    return views


def shift(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move [N, C, H, W] images ``dx`` pixels right and ``dy`` down, filling with zeros (no ink)."""
    if dx == dy == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1))
    return padded[..., 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]


class FastEmbedding(nn.Module):
    """``blocks`` × (3 × 3 conv, batch norm, ReLU, 2 × 2 max-pool), flattened; ``final_pool=False`` drops the
    last block's pool, keeping a four times larger map (at 28 px: 3 × 3 instead of 1 × 1 per channel).

    The first block has ``width`` channels and each later one ``widen`` times those of the block before (at
    ``widen=2``, the channels double as the maps halve, as in VGG and ResNet).
    """

    def __init__(
        self,
        input_px: int,
        width: int,
        blocks: int,
        batch_norm: bool = True,
        final_pool: bool = True,
        widen: int = 1,
    ) -> None:
        super().__init__()
        if width < 1 or widen < 1:
            raise ConfigError(f"width={width} and widen={widen}: both must be at least 1")
        if blocks < 1:  # no block at all would be a linear model of the raw pixels
            raise ConfigError(f"blocks={blocks}: a network needs at least 1 block")
        pools = blocks if final_pool else blocks - 1  # the first `pools` blocks end in a max-pool
        if pools >= input_px.bit_length():  # checked before anything is built: the maps would vanish
            raise ConfigError(f"{blocks} blocks need an input of at least {2**pools} px, got {input_px}")
        widths = [width * widen**block for block in range(blocks)]
        convolutions = list(pairwise([1, *widths]))  # each block's channels in and out
        size = input_px >> pools
        weights = sum(9 * before * after for before, after in convolutions) + widths[-1] * size * size
        if weights > MOST_WEIGHTS:  # the convolutions and the head on their output
            raise ConfigError(f"width={width}, widen={widen}, blocks={blocks} at {input_px} px make {weights:,} "
                              f"weights, more than {MOST_WEIGHTS:,}")
        layers: list[nn.Module] = []
        for block, (before, after) in enumerate(convolutions):
            layers += [
                nn.Conv2d(before, after, 3, padding=1, bias=not batch_norm),
                nn.BatchNorm2d(after) if batch_norm else nn.Identity(),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2) if block < pools else nn.Identity(),
            ]
        self.features = nn.Sequential(*layers)
        self.dim = widths[-1] * size * size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).flatten(1)


class KochEmbedding(nn.Module):
    """Koch et al. (2015): conv 64@10, 128@7, 128@4, 256@4 with max-pools, then a 4,096-unit sigmoid layer."""

    def __init__(self, input_px: int) -> None:
        super().__init__()
        _check_input_px("koch", input_px, 65)  # 10-px conv, pool, 7-px conv, pool, 4-px conv, pool, 4-px conv
        self.features = nn.Sequential(
            nn.Conv2d(1, 64, 10), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 7), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 4), nn.ReLU(inplace=True),
        )  # fmt: skip
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, input_px, input_px)).numel()
        self.project = nn.Sequential(nn.Linear(flat, 4096), nn.Sigmoid())
        self.dim = 4096

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images).flatten(1))


class VGG16Embedding(nn.Module):
    """torchvision's VGG16 conv stack (no batch norm) on 3-channel input, as in the reference."""

    def __init__(self, input_px: int, pretrained: bool = False) -> None:
        super().__init__()
        _check_input_px("vgg16", input_px, 32)  # five 2 × 2 max-pools
        from torchvision.models import VGG16_Weights, vgg16

        weights = VGG16_Weights.IMAGENET1K_V1 if pretrained else None
        try:
            self.features = vgg16(weights=weights).features
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            raise ConfigError(
                f"cannot fetch ImageNet VGG16 weights ({error}); train without --pretrained, or put the file "
                "in torch's hub cache (TORCH_HOME) on a machine with internet first"
            ) from None
        self.dim = 512 * (input_px // 32) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images.expand(-1, 3, -1, -1)).flatten(1)


def _check_input_px(backbone: str, input_px: int, least: int) -> None:
    if input_px < least:  # torch would say it in the first forward pass, of the layer where the maps vanish
        raise ConfigError(f"the {backbone} backbone needs an input of at least {least} px, got {input_px}")


def _similarity_head(config: ModelConfig, dim: int) -> nn.Module:
    if config.backbone == "vgg16":  # the reference's two linear layers, no activation between them
        return nn.Sequential(nn.Linear(dim, 512), nn.Linear(512, 1))
    return nn.Linear(dim, 1)  # Koch's weighted L1 distance


def _backbone(config: ModelConfig, pretrained: bool) -> nn.Module:
    if config.backbone == "fast":
        return FastEmbedding(
            config.input_px, config.width, config.blocks, config.batch_norm, config.final_pool, config.widen
        )
    if config.backbone == "koch":
        return KochEmbedding(config.input_px)
    if config.backbone == "vgg16":
        return VGG16Embedding(config.input_px, pretrained)
    raise ConfigError(f"unknown backbone {config.backbone!r}: choose one of {', '.join(BACKBONES)}")


class Embedding(nn.Module):
    """The shared twin: frame or resize to the backbone's input, run it, optionally L2-normalise.

    Outside training it averages ``views`` shifted views of each image (re-normalised when ``normalize``);
    ``forward(images, views=1)`` asks for a single view.
    """

    def __init__(self, config: ModelConfig, pretrained: bool = False) -> None:
        super().__init__()
        check_views(config.views)
        self.backbone = _backbone(config, pretrained)
        self.input_px = config.input_px
        self.frame = config.frame
        self.normalize = config.normalize
        self.views = config.views
        self.dim = self.backbone.dim

    def forward(self, images: torch.Tensor, views: int | None = None) -> torch.Tensor:
        return self.at_input_size(self.to_input(images, self.input_px), views)

    def to_input(self, images: torch.Tensor, size_px: int) -> torch.Tensor:
        """Ink images of any size as this model sees them, area-resized to ``size_px``: framed first when
        ``ModelConfig.frame`` is set."""
        return frame_ink(images, self.frame, size_px) if self.frame else resize_to(images, size_px)

    def at_input_size(self, images: torch.Tensor, views: int | None = None) -> torch.Tensor:
        """``forward`` for images already as the backbone sees them: at its input size, framed where the model frames
        (training batches)."""
        views = 1 if self.training else self.views if views is None else check_views(views)
        if views == 1:
            return self._one_view(images)
        vectors = sum(self._one_view(shift(images, dx, dy)) for dx, dy in VIEW_SHIFTS[views]) / views
        return F.normalize(vectors, dim=1) if self.normalize else vectors

    def _one_view(self, images: torch.Tensor) -> torch.Tensor:
        vectors = self.backbone(images)
        return F.normalize(vectors, dim=1) if self.normalize else vectors


class SiameseNetwork(nn.Module):
    """Twin network with shared weights: ``forward(x1, x2)`` gives one same-class logit per pair.

    Args:
        config: the architecture (see :class:`ModelConfig`).
        pretrained: start the vgg16 backbone from ImageNet weights (needs internet or a warm cache).
    """

    def __init__(self, config: ModelConfig, pretrained: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embedding = Embedding(config, pretrained)
        self.head = _similarity_head(config, self.embedding.dim)

    @property
    def embedding_dim(self) -> int:
        """Length of the vectors :meth:`embed` returns."""
        return self.embedding.dim

    def embed(self, images: torch.Tensor, views: int | None = None) -> torch.Tensor:
        """Embed ink images [N, 1, H, W] of any size into vectors [N, embedding_dim].

        Outside training each vector averages ``views`` shifted views (default: ``config.views``).
        """
        if images.dim() != 4 or images.shape[1] != 1 or not images.is_floating_point():
            # else torch's error from a layer within, or, for three channels, vectors of nothing meant
            kind = str(images.dtype).removeprefix("torch.")
            raise DataError(f"embed takes float ink images [N, 1, H, W] (0 paper, 1 ink), got {kind} "
                            f"{list(images.shape)}; siamese_omniglot.data.to_ink makes them of uint8 canvases")
        return self.embedding(images, views)

    def score_embeddings(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Same-class logits [N] for pairs of embeddings [N, D] (broadcasting allowed)."""
        if first.shape[-1] != self.embedding_dim or second.shape[-1] != self.embedding_dim:
            raise DataError(f"score_embeddings takes embeddings of {self.embedding_dim} values, got "
                            f"{first.shape[-1]} and {second.shape[-1]}")
        return self.head((first - second).abs()).squeeze(-1)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Same-class logits [N] for two batches of N ink images (batch-first; DataParallel-safe); a batch of one
        image is compared with each image of the other."""
        sizes = [len(first), len(second)]
        if sizes[0] != sizes[1] and 1 not in sizes:
            raise DataError(f"forward takes two batches of as many images, or one image and a batch; got {sizes[0]} "
                            f"and {sizes[1]}")
        both = self.embed(torch.cat([first, second]))
        return self.score_embeddings(*both.split(sizes))


BACKBONES = {
    "fast": ModelConfig(
        backbone="fast",
        input_px=28,
        width=32,
        widen=2,
        blocks=4,
        normalize=True,
        final_pool=False,
        views=5,
        frame=0.8,
    ),
    "koch": ModelConfig(backbone="koch", input_px=105),
    "vgg16": ModelConfig(backbone="vgg16", input_px=105),
}


def fold_batch_norm(model: SiameseNetwork) -> SiameseNetwork:
    """A copy of ``model`` for inference, each batch norm folded into the convolution before it: the same
    outputs in eval mode (to float rounding) without a pass over every feature map per norm."""
    folded = copy.deepcopy(model).eval()
    for sequence in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i, (conv, norm) in enumerate(pairwise(list(sequence))):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                sequence[i], sequence[i + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
    return folded


def build_model(name: str = "fast", pretrained: bool = False, **overrides) -> SiameseNetwork:
    """Build a SiameseNetwork from a backbone name, with optional ModelConfig overrides.

    >>> build_model("fast", input_px=32).config.input_px
    32
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(ModelConfig)})
    if unknown:  # else ModelConfig.from_dict would blame a checkpoint
        raise ConfigError(f"ModelConfig has no setting {unknown[0]!r}: choose among "
                          f"{', '.join(f.name for f in fields(ModelConfig))}")
    base = BACKBONES[name].to_dict() | overrides
    return SiameseNetwork(ModelConfig.from_dict(base), pretrained=pretrained)


class CosineClassifier(nn.Module):
    """Scaled cosine-similarity classifier over training classes (the classify objective's head).

    Normalised weights and features make class scores depend only on direction, which suits
    comparing embeddings by distance afterwards (Wang et al. 2018, "CosFace"; Chen et al. 2019).
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T
