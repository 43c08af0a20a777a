"""Data: Omniglot and custom image trees decoded once, pair sampling, splits and one-shot episodes."""

from .episodes import Episodes, LakeRuns, load_lake_runs, run_episodes, sample_drawer_runs, sample_episodes
from .images import CANVAS_PX, ImageSet, decode_image, read_image, to_ink
from .omniglot import load_evaluation_set, load_folder, load_split, load_training_set
from .pairs import (
    NEGATIVES,
    NegativeDesign,
    Pairs,
    PairSampler,
    fixed_pairs,
    seeded_generator,
    split_images,
    split_validation,
)

__all__ = [
    "CANVAS_PX",
    "NEGATIVES",
    "Episodes",
    "ImageSet",
    "LakeRuns",
    "NegativeDesign",
    "PairSampler",
    "Pairs",
    "decode_image",
    "fixed_pairs",
    "load_evaluation_set",
    "load_folder",
    "load_lake_runs",
    "load_split",
    "load_training_set",
    "read_image",
    "run_episodes",
    "sample_drawer_runs",
    "sample_episodes",
    "seeded_generator",
    "split_images",
    "split_validation",
    "to_ink",
]
