"""siamese-omniglot: one-shot handwritten-character verification and recognition with Siamese networks.

Quick start::

    import siamese_omniglot as so

    images = so.load_training_set("datasets")                # Omniglot background alphabets, decoded once
    trainer = so.Trainer(so.preset("fast"), images, "logs/run", so.resolve_device("auto"))
    result = trainer.fit()                                    # checkpoints, metrics.jsonl, epoch_loss.png
    verifier = so.Verifier.from_checkpoint(result.best_checkpoint)
    print(verifier.compare("a.png", "b.png"))                 # Comparison(score=…, same=…, threshold=…)

Modules: ``devices`` (sdaa/cuda/cpu), ``data`` (Omniglot, custom trees, pairs, episodes), ``models``,
``config``, ``train``, ``checkpoint``, ``verify``, ``evaluate``, ``cli``.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, TrainConfig, preset
from .data import (
    ImageSet,
    LakeRuns,
    Pairs,
    PairSampler,
    load_evaluation_set,
    load_lake_runs,
    load_split,
    load_training_set,
    sample_episodes,
    split_validation,
)
from .devices import resolve_device
from .errors import CheckpointError, ConfigError, DataError, DeviceError, OutputError, SiameseError, TrainingError
from .evaluate import OneShotResult, PairMetrics, lake_runs_accuracy, one_shot_accuracy, pair_metrics
from .models import ModelConfig, SiameseNetwork, build_model
from .train import EpochMetrics, Trainer, TrainResult
from .verify import Comparison, Verifier

__version__ = "0.1.0.dev0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Comparison",
    "ConfigError",
    "DataError",
    "DeviceError",
    "EpochMetrics",
    "ImageSet",
    "LakeRuns",
    "ModelConfig",
    "OneShotResult",
    "OutputError",
    "PairMetrics",
    "PairSampler",
    "Pairs",
    "SiameseError",
    "SiameseNetwork",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "Verifier",
    "build_model",
    "lake_runs_accuracy",
    "load_checkpoint",
    "load_evaluation_set",
    "load_lake_runs",
    "load_split",
    "load_training_set",
    "one_shot_accuracy",
    "pair_metrics",
    "preset",
    "resolve_device",
    "sample_episodes",
    "save_checkpoint",
    "split_validation",
]
