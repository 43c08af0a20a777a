"""siamese-omniglot: one-shot handwritten-character verification and recognition with Siamese networks.

Quick start::

    import siamese_omniglot as so

    images = so.load_training_set("datasets")                # Omniglot background alphabets, decoded once
    trainer = so.Trainer(so.preset("fast"), images, "logs/run", so.resolve_device("auto"))
    result = trainer.fit()                                    # checkpoints, metrics.jsonl, epoch_loss.png
    verifier = so.Verifier.from_checkpoint(result.best_checkpoint)
    print(verifier.compare("a.png", "b.png"))                 # Comparison(score=…, same=…, threshold=…)
    print(verifier.classify("query.png", "support/")[0].best)  # Match(class_name=…, score=…, same=…)

Modules: ``devices`` (sdaa/cuda/cpu), ``data`` (Omniglot, custom trees, pairs, episodes), ``models``,
``config``, ``train``, ``checkpoint``, ``verify``, ``gallery`` (support folders), ``evaluate``, ``export``
(ONNX), ``figures`` (matplotlib pictures), ``cli``.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
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
    from .errors import (
        CheckpointError,
        ConfigError,
        DataError,
        DependencyError,
        DeviceError,
        ExportError,
        OutputError,
        SiameseError,
        TrainingError,
    )
    from .evaluate import OneShotResult, PairMetrics, lake_runs_accuracy, one_shot_accuracy, pair_metrics
    from .export import OnnxExport, export_onnx
    from .gallery import Classification, Match, Support
    from .models import ModelConfig, SiameseNetwork, build_model, fold_batch_norm
    from .train import EpochMetrics, Trainer, TrainResult
    from .verify import Comparison, Verifier, default_checkpoint

_MODULES = {  # the public names, by the module defining them
    ".checkpoint": ("load_checkpoint", "save_checkpoint"),
    ".config": ("PRESETS", "TrainConfig", "preset"),
    ".data": (
        "ImageSet", "LakeRuns", "Pairs", "PairSampler", "load_evaluation_set", "load_lake_runs", "load_split",
        "load_training_set", "sample_episodes", "split_validation",
    ),
    ".devices": ("resolve_device",),
    ".errors": (
        "CheckpointError", "ConfigError", "DataError", "DependencyError", "DeviceError", "ExportError", "OutputError",
        "SiameseError", "TrainingError",
    ),
    ".evaluate": ("OneShotResult", "PairMetrics", "lake_runs_accuracy", "one_shot_accuracy", "pair_metrics"),
    ".export": ("OnnxExport", "export_onnx"),
    ".gallery": ("Classification", "Match", "Support"),
    ".models": ("ModelConfig", "SiameseNetwork", "build_model", "fold_batch_norm"),
    ".train": ("EpochMetrics", "Trainer", "TrainResult"),
    ".verify": ("Comparison", "Verifier", "default_checkpoint"),
}

__version__ = "0.1.0.dev0"
__all__ = [
    "PRESETS",
    "CheckpointError",
    "Classification",
    "Comparison",
    "ConfigError",
    "DataError",
    "DependencyError",
    "DeviceError",
    "EpochMetrics",
    "ExportError",
    "ImageSet",
    "LakeRuns",
    "Match",
    "ModelConfig",
    "OneShotResult",
    "OnnxExport",
    "OutputError",
    "PairMetrics",
    "PairSampler",
    "Pairs",
    "SiameseError",
    "SiameseNetwork",
    "Support",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "Verifier",
    "build_model",
    "default_checkpoint",
    "export_onnx",
    "fold_batch_norm",
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

if not TYPE_CHECKING:  # so type checkers still refuse a misspelt name
    __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
