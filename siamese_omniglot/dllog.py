"""Training records through Tecorigin's ``tcap_dllogger``, when it is installed (as the reference logged).

The reference wrote "imgs/s" that counted dataset items (4 images each); here the units are explicit:
``train.pairs_per_s`` and ``train.images_per_s``, both over all ranks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from .train import Progress


def dllogger_callback(path: str | Path) -> Callable[[Progress], None] | None:
    """A progress callback writing JSON lines to ``path`` through ``tcap_dllogger``; None if it is absent."""
    try:
        dll = importlib.import_module("tcap_dllogger")
    except ImportError:
        return None
    logger = dll.Logger([dll.JSONStreamBackend(dll.Verbosity.VERBOSE, str(path))])
    logger.metadata("train.loss", {"unit": "", "GOAL": "MINIMIZE", "STAGE": "TRAIN"})
    logger.metadata("train.lr", {"unit": "", "STAGE": "TRAIN"})
    logger.metadata("train.pairs_per_s", {"unit": "pairs/s", "format": ":.1f", "GOAL": "MAXIMIZE", "STAGE": "TRAIN"})
    logger.metadata("train.images_per_s", {"unit": "images/s", "format": ":.1f", "GOAL": "MAXIMIZE", "STAGE": "TRAIN"})

    def record(progress: Progress) -> None:
        data = {
            "train.loss": progress.loss,
            "train.lr": progress.lr,
            "train.pairs_per_s": progress.pairs_per_s,
            "train.images_per_s": progress.images_per_s,
        }
        logger.log(step=(progress.epoch, progress.step), data=data, verbosity=dll.Verbosity.DEFAULT)

    return record
