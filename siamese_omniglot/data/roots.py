"""Where the data lives: the data root and the download mirror, from options or the environment.

Torch-free, so the command line can name them in its help before the library loads.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "SIAMESE_DATA"
MIRROR_ENV = "SIAMESE_OMNIGLOT_MIRROR"
DEFAULT_ROOT = "datasets"


def data_root(data: str | Path | None = None) -> Path:
    """The data root: ``data`` if given, else ``$SIAMESE_DATA``, else ``./datasets``."""
    return Path(data or os.environ.get(DATA_ENV) or DEFAULT_ROOT).expanduser()


def mirror_source(mirror: str | None = None) -> str | None:
    """The mirror to download from: ``mirror`` if given, else ``$SIAMESE_OMNIGLOT_MIRROR``, else None."""
    return mirror or os.environ.get(MIRROR_ENV) or None
