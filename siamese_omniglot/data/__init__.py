"""Data: Omniglot and custom image trees decoded once, pair sampling, splits and one-shot episodes."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
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

_MODULES = {  # the public names, by the module defining them
    ".episodes": ("Episodes", "LakeRuns", "load_lake_runs", "run_episodes", "sample_drawer_runs", "sample_episodes"),
    ".images": ("CANVAS_PX", "ImageSet", "decode_image", "read_image", "to_ink"),
    ".omniglot": ("load_evaluation_set", "load_folder", "load_split", "load_training_set"),
    ".pairs": (
        "NEGATIVES", "NegativeDesign", "Pairs", "PairSampler", "fixed_pairs", "seeded_generator", "split_images",
        "split_validation",
    ),
}

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

if not TYPE_CHECKING:  # so type checkers still refuse a misspelt name
    __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
