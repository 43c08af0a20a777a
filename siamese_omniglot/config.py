"""Training configuration: one dataclass, filled by the CLI or by Python callers, and named presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from .errors import ConfigError

OBJECTIVES = ("pair", "classify")
VAL_SPLITS = ("alphabets", "images")
# TrainConfig fields that set a ModelConfig
MODEL_SETTINGS = ("input_px", "batch_norm", "width", "widen", "views", "frame")
REFERENCE_BATCH = 64  # the learning-rate rule: lr is scaled by global batch / REFERENCE_BATCH


@dataclass(frozen=True)
class TrainConfig:
    """How to train a model.

    ``batch_size`` counts items per step per process: for the ``pair`` objective each item is one
    same-class pair and one different-class pair (the reference's convention: 32 items = 64 pairs =
    128 images); for the ``classify`` objective each item is one image. The learning rate actually
    used is ``lr × batch_size × world_size / 64`` (the reference's rule).
    """

    preset: str = "fast"
    backbone: str = "fast"
    objective: str = "classify"  # "pair": BCE on the head's logit; "classify": softmax over training characters
    epochs: int = 30
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.01
    amp: bool | None = None  # None: on for accelerators, off on cpu
    seed: int = 0
    augment: bool = True  # distort training images: Koch et al.'s small affine maps, bent by `elastic`
    elastic: float = 0.15  # with augment: std of a smooth random displacement bending the strokes (0: affine only)
    supersample: int = 3  # with augment: distort at this many times the input size, then average down (anti-aliased)
    within_alphabet: float = 0.5  # probability that a negative pair shares an alphabet
    val_fraction: float = 0.15  # fraction of alphabets (or of each class's images) held out for validation
    val_split: str = "alphabets"  # "alphabets": unseen characters; "images": the reference's 90/10 image split
    val_pairs: int = 1000  # same and different validation pairs each (twice for calibration)
    val_trials: int = 2000  # 1-shot validation trials among held-out classes (what best.pt maximises)
    average_best: int = 2  # at the end, best.pt averages the weights of this many best epochs if that validates higher
    pretrained: bool = False  # vgg16 only: start from ImageNet weights
    input_px: int | None = None  # model input size (None: the backbone's default)
    batch_norm: bool | None = None  # fast backbone only (None: on)
    width: int | None = None  # fast backbone only: channels of the first block (None: the backbone's 32)
    widen: int | None = None  # fast backbone only: channel factor from each block to the next (None: backbone's 2)
    views: int | None = None  # shifted views averaged per embedding outside training: 1, 5 or 9 (None: backbone's)
    frame: float | None = None  # share of the input a framed character's longer side fills, 0 = off (None: backbone's)
    log_every: int = 50  # steps between progress reports (the loop's only host syncs, but for float16 on sdaa)

    def __post_init__(self) -> None:
        if self.val_split not in VAL_SPLITS:
            raise ConfigError(f"unknown validation split {self.val_split!r}: choose one of {', '.join(VAL_SPLITS)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        least = {"epochs": 1, "batch_size": 1, "max_steps": 1, "val_pairs": 10, "val_trials": 1, "log_every": 1,
                 "width": 1, "widen": 1, "supersample": 1, "average_best": 1}
        for name, minimum in least.items():
            value = getattr(self, name)
            if value is None and name in ("max_steps", "width", "widen"):  # no limit, or the backbone's own
                continue
            if not value >= minimum:
                raise ConfigError(f"invalid setting {name}={value!r}: must be at least {minimum}")
        if not 0 < self.lr < math.inf:  # NaN too
            raise ConfigError(f"invalid setting lr={self.lr!r}: must be a finite number > 0")
        for name in ("elastic", "weight_decay"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN too
                raise ConfigError(f"invalid setting {name}={getattr(self, name)!r}: must be a finite number ≥ 0")
        for name in ("warmup_fraction", "min_lr_fraction", "within_alphabet"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"invalid setting {name}={getattr(self, name)!r}: must be between 0 and 1")
        if not 0 < self.val_fraction < 1:  # some held out, some left to train on
            raise ConfigError(f"invalid setting val_fraction={self.val_fraction!r}: must be between 0 and 1, both "
                              "excluded")
        if not 0 < self.momentum < 1:  # Nesterov momentum needs some; 1 or more never forgets a gradient
            raise ConfigError(f"invalid setting momentum={self.momentum!r}: must be between 0 and 1, both excluded")
        if not -(2**63) <= self.seed < 2**63:  # torch.manual_seed takes 64 bits
            raise ConfigError(f"invalid setting seed={self.seed}: must fit in 64 bits (-2**63 to 2**63 - 1)")
        if self.pretrained and self.backbone != "vgg16":
            raise ConfigError(
                f"pretrained weights exist only for the vgg16 network (preset seed), not {self.backbone!r} "
                f"(preset {self.preset}): drop --pretrained"
            )

    def to_dict(self) -> dict:
        """Plain dict for JSON and checkpoints."""
        return asdict(self)

    def model_overrides(self) -> dict:
        """The ModelConfig settings this config changes from the backbone's defaults."""
        values = {name: getattr(self, name) for name in MODEL_SETTINGS}
        return {name: value for name, value in values.items() if value is not None}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`, ignoring keys this version does not know.

        Settings added since a checkpoint was written take the value that reproduces its training (``ADDED_SINCE``);
        the network's settings left to the backbone's defaults, which may have changed since, are restored from the
        checkpoint's model config by :func:`~siamese_omniglot.train.resume_config`.
        """
        known = {f.name for f in fields(cls)}
        return cls(**(ADDED_SINCE | {k: v for k, v in values.items() if k in known}))


# Settings added after checkpoints were first written, with the value that reproduces the training of a
# checkpoint that lacks them.
ADDED_SINCE: dict[str, object] = {"elastic": 0.0, "views": 1, "supersample": 1, "average_best": 1}

PRESETS: dict[str, TrainConfig] = {
    # Fast CPU default: a 4-block conv net at 28 × 28 whose channels double from block to block (32 to 256; no pool
    # after the last block: a 3 × 3 × 256 embedding) trained as a character classifier on affine and elastic
    # distortions (drawn at 84 × 84, averaged down), then used as a Siamese verifier whose head is calibrated on
    # held-out alphabets.
    "fast": TrainConfig(),
    # For one GPU: the fast recipe with twice the channels (64 to 512, a 4,608-value embedding). On the CPU at 10
    # epochs, more channels raised validation 1-shot accuracy most of the network changes tried (docs/results.md,
    # "What was tried"). Not measured on a GPU yet; trained in full on a 2-core CPU, it scored no higher than fast
    # (docs/results.md, accuracy row 16).
    "wide": TrainConfig(preset="wide", width=64),
    # Koch et al. (2015): their network trained on pairs.
    "koch": TrainConfig(
        preset="koch", backbone="koch", objective="pair", epochs=20, batch_size=32, lr=0.01, weight_decay=2e-4,
        elastic=0.0, supersample=1, average_best=1,  # their affine distortions only, at their 105 × 105 input
    ),
    # The reference (Tecorigin modelzoo Siamese): VGG16, batch 32, lr 1e-2, SGD-nesterov, warm-up + cosine,
    # 50 epochs, AMP on accelerators.
    "seed": TrainConfig(
        preset="seed", backbone="vgg16", objective="pair", epochs=50, batch_size=32, lr=0.01, weight_decay=5e-4,
        elastic=0.0, supersample=1, average_best=1,
    ),
}


def preset(name: str, **overrides) -> TrainConfig:
    """A named preset with some settings replaced (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"TrainConfig has no setting {', '.join(map(repr, unknown))}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
